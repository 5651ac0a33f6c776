"""Which GGUF files are models, and what llama.cpp calls them: the split naming, the
tag of a file name, projector (mmproj) files and their precision, and the companion
files (imatrix, draft heads) that are not models.
"""

from __future__ import annotations

import re

from corral.catalog.gguf_header import GGUFMetadata

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
"""llama.cpp's split naming (``llama_split_path``): ``PREFIX-00001-of-00003.gguf``."""

TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)
"""llama.cpp's ``get_gguf_split_info`` tag: the last ``-``/``.`` separated word."""

DRAFT_PREFIXES = ("mtp-", "eagle3-", "dflash-", "dspark-")
"""Draft-head companions llama.cpp's router skips as models (``common/preset.cpp``)."""

MMPROJ_PREFERENCE: tuple[str, ...] = ("BF16", "F16", "F32")
"""Projector precisions, best first; anything else ranks after these."""

PRECISION_IN_NAME = re.compile(r"(?<![a-z0-9])(bf16|f16|f32)(?![a-z0-9])", re.I)


def is_mmproj_name(name: str) -> bool:
    return "mmproj" in name.lower()


def is_other_companion(name: str) -> bool:
    lower = name.lower()
    return "imatrix" in lower or lower.startswith(DRAFT_PREFIXES)


def mmproj_rank(meta: GGUFMetadata) -> tuple[int, str]:
    precision = (meta.quantization or "").upper()
    if precision not in MMPROJ_PREFERENCE:
        found = PRECISION_IN_NAME.search(meta.path.name)
        precision = found.group(1).upper() if found else ""
    rank = MMPROJ_PREFERENCE.index(precision) if precision in MMPROJ_PREFERENCE else 99
    return rank, meta.path.name


def file_tag(stem: str) -> str | None:
    found = TAG_RE.search(stem)
    return found.group(1).upper() if found else None
