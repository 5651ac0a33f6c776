"""Find GGUF models in folders and read what a scheduler needs to know about them.

The catalog answers "which models can this host serve, and what are they?" without
loading a single weight: each file's GGUF header gives the architecture, training
context, parameter count, quantization and whether a chat template is embedded.

Where models come from
----------------------
* ``--models-dir`` folders (repeatable), searched recursively. With none given,
  :func:`default_models_dirs`: llama.cpp's cache (``LLAMA_CACHE``, else
  ``$XDG_CACHE_HOME/llama.cpp`` or ``~/.cache/llama.cpp``; ``~/Library/Caches/llama.cpp``
  on macOS) and the Hugging Face hub cache (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
  ``HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``),
  the same order llama.cpp's ``common/hf-cache.cpp`` uses, since recent llama.cpp
  stores ``-hf`` downloads in the hub layout.
* The hub layout ``models--ORG--NAME/snapshots/<rev>/*.gguf`` holds symlinks into
  ``blobs/``. Ids still come from the file name; the model's ``path`` stays the
  snapshot path (llama.cpp finds a split model's other shards by *name*, and blob
  names are hashes), while size and metadata come from the blob. When several
  revisions hold the same file, the one ``refs/main`` names wins (else the newest),
  and the repo gives the model an alias ``ORG/NAME:TAG`` (``TAG`` as llama.cpp
  derives it from the file name, e.g. ``Q4_K_M``), the name llama-server's router
  mode uses for cached models.
* ``models`` entries of the config file are *manual*: kept exactly as written and never
  changed by a rescan. A discovered file that a manual entry already points at is not
  listed twice.

Rules
-----
* A split model (``name-00001-of-00003.gguf`` ...) is one model named ``name``: its
  ``path`` is the first shard, its size the sum. A split with a missing shard is
  reported as a problem and not served.
* ``*mmproj*.gguf`` files (or ``general.type == "mmproj"``) are never models. Every
  model in the same folder gets the best one attached: BF16, then F16, then F32
  (by the file's metadata, else by its name), then any other.
* Other companion files (``imatrix``, ``mtp-``/``eagle3-``/``dflash-``/``dspark-``
  draft heads, LoRA adapters) are not models either and are left out quietly.
* Ids are unique: on a collision the first path (sorted) keeps the bare id, the next
  gets ``-<folder>`` (the parent folder, or the hub repo), then ``-2``, ``-3`` ...
  A rescan keeps the id a file already had, so names clients use stay stable.
* A bad file (not GGUF, truncated download, broken blob symlink, unreadable) becomes a
  :class:`ScanProblem` with a reason; the scan goes on.

Headers are read by :mod:`corral.catalog.gguf_header` (fast: it skips arrays).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from corral.catalog.gguf_header import (
    GGUFError,
    GGUFMetadata,
    quantization_name,
    read_gguf_metadata,
)
from corral.catalog.names import pattern_matches

if TYPE_CHECKING:
    from corral.config import ModelConfig, Settings

__all__ = [
    "Catalog",
    "CatalogChange",
    "CatalogModel",
    "GGUFError",
    "GGUFMetadata",
    "ScanProblem",
    "ScanResult",
    "Signature",
    "default_models_dirs",
    "folder_signature",
    "hf_hub_cache_dir",
    "llama_cpp_cache_dir",
    "manual_model",
    "quantization_name",
    "read_gguf_metadata",
    "scan",
    "scan_folders",
    "watch",
]

logger = logging.getLogger(__name__)

Source = Literal["auto", "manual"]

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.I)
"""llama.cpp's split naming (``llama_split_path``): ``PREFIX-00001-of-00003.gguf``."""

_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)
"""llama.cpp's ``get_gguf_split_info`` tag: the last ``-``/``.`` separated word."""

_DRAFT_PREFIXES = ("mtp-", "eagle3-", "dflash-", "dspark-")
"""Draft-head companions llama.cpp's router skips as models (``common/preset.cpp``)."""

MMPROJ_PREFERENCE: tuple[str, ...] = ("BF16", "F16", "F32")
"""Projector precisions, best first; anything else ranks after these."""

_PRECISION_IN_NAME = re.compile(r"(?<![a-z0-9])(bf16|f16|f32)(?![a-z0-9])", re.I)

# -- models --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model clients can ask for, with what its files' headers say.

    ``path`` is what llama-server's ``--model`` gets: the file, or a split model's first
    shard. It is ``None`` only for a manual model whose config names no file.
    """

    id: str
    path: Path | None
    shards: tuple[Path, ...] = ()
    size_bytes: int = 0
    architecture: str | None = None
    context_length: int | None = None
    parameter_count: int | None = None
    file_type: int | None = None
    quantization: str | None = None
    has_chat_template: bool = False
    mmproj: Path | None = None
    source: Source = "auto"
    aliases: tuple[str, ...] = ()
    repo: str | None = None
    """Hugging Face repo (``ORG/NAME``) when found in a hub cache."""
    name: str | None = None
    """``general.name`` from the header."""
    config: ModelConfig | None = field(default=None, compare=False, repr=False)
    """The config entry of a manual model (its args, TTL, group ...)."""
    kv_bytes_per_token: int | None = None
    """f16 K+V cache bytes per token of context (memory estimates)."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request's ``model`` field may use for this model."""
        return (self.id, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``corral models list --json`` and the management API."""
        return {
            "id": self.id,
            "path": str(self.path) if self.path else None,
            "shards": [str(p) for p in self.shards],
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "context_length": self.context_length,
            "parameter_count": self.parameter_count,
            "file_type": self.file_type,
            "quantization": self.quantization,
            "has_chat_template": self.has_chat_template,
            "mmproj": str(self.mmproj) if self.mmproj else None,
            "source": self.source,
            "aliases": list(self.aliases),
            "repo": self.repo,
            "name": self.name,
        }

    def to_model_config(self) -> ModelConfig:
        """The ``models:`` entry that serves this model (``corral models import --write``).

        The projector goes into ``args`` as ``--mmproj`` because the config has no field
        of its own for it yet.
        """
        from corral.config import ModelConfig

        if self.config is not None:
            return self.config
        args = ["--mmproj", str(self.mmproj)] if self.mmproj else []
        return ModelConfig(path=self.path, aliases=list(self.aliases), args=args)


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A file (or folder) that yielded no model, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


Signature = frozenset[tuple[str, int, int]]
"""(path, size, mtime_ns) of every GGUF file under the folders: equal means unchanged."""

_CacheKey = tuple[str, int, int]
MetadataCache = dict[_CacheKey, "GGUFMetadata | str"]
"""(real path, size, mtime_ns) -> metadata or the reason it could not be read."""


@dataclass(slots=True)
class ScanResult:
    """Everything one pass over the folders found. Computing it touches no catalog state,
    so it can run in a worker thread; :meth:`Catalog.apply` installs it."""

    models: list[CatalogModel]
    problems: list[ScanProblem]
    signature: Signature
    cache: MetadataCache = field(default_factory=dict)


@dataclass(slots=True)
class CatalogChange:
    """What a rescan changed among the auto models (manual ones never change)."""

    added: list[CatalogModel] = field(default_factory=list)
    removed: list[CatalogModel] = field(default_factory=list)
    updated: list[CatalogModel] = field(default_factory=list)
    """Same id, different file or metadata (a re-downloaded or replaced model)."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)


# -- default folders -----------------------------------------------------------------


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def llama_cpp_cache_dir() -> Path:
    """Where llama.cpp caches downloads (``fs_get_cache_directory`` in common.cpp)."""
    explicit = _env_path("LLAMA_CACHE")
    if explicit:
        return explicit
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llama.cpp"
    if sys.platform == "win32":  # pragma: no cover - corral targets Linux and macOS
        return (_env_path("LOCALAPPDATA") or Path.home()) / "llama.cpp"
    return (_env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama.cpp"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved as huggingface_hub and llama.cpp do."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        explicit = _env_path(name)
        if explicit:
            return explicit
    home = _env_path("HF_HOME")
    if home:
        return home / "hub"
    return (_env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"


def default_models_dirs() -> list[Path]:
    """llama.cpp's cache and the HF hub cache: where ``llama-server -hf`` puts models."""
    found: list[Path] = []
    for path in (llama_cpp_cache_dir(), hf_hub_cache_dir()):
        if path not in found:
            found.append(path)
    return found


# -- walking folders -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    real: Path
    size: int
    mtime_ns: int
    repo: str | None = None
    repo_dir: Path | None = None
    revision: str | None = None
    in_snapshot: str | None = None
    """Path inside the hub snapshot (``sub/name.gguf``): equal across revisions."""


def _hub_location(path: Path) -> tuple[str, Path, str, str] | None:
    """``(ORG/NAME, repo folder, revision, path in snapshot)`` for a hub-cache file."""
    parts = path.parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = parts[i].removeprefix("models--").replace("--", "/")
            return repo, Path(*parts[: i + 1]), parts[i + 2], "/".join(parts[i + 3 :])
    return None


def _walk(
    dirs: Iterable[Path], problems: list[ScanProblem] | None, *, missing_ok: bool = False
) -> tuple[list[_File], Signature]:
    """Every ``*.gguf`` below ``dirs`` (symlinks followed, each folder once), stat'ed.

    With ``problems`` ``None`` only the signature is wanted: nothing is resolved or
    collected. Hidden entries are skipped: the hub cache keeps empty
    ``.no_exist/<rev>/x.gguf`` markers there, and writers keep temporary files there.
    """
    files: list[_File] = []
    signature: set[tuple[str, int, int]] = set()
    visited: set[tuple[int, int]] = set()
    for root in dirs:
        root = Path(root).expanduser()
        if not root.is_dir():
            if problems is not None and not missing_ok:
                problems.append(ScanProblem(root, "not a folder (or it does not exist)"))
            signature.add((str(root), -1, -1))  # so its appearance counts as a change
            continue

        def on_error(exc: OSError) -> None:
            if problems is not None:
                where = Path(exc.filename) if exc.filename else root  # noqa: B023
                problems.append(ScanProblem(where, f"cannot read folder: {exc.strerror}"))

        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a folder seen twice
                dirnames[:] = []
                continue
            visited.add((st.st_dev, st.st_ino))
            in_repo = Path(dirpath).name.startswith("models--")
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not (in_repo and d == "blobs")
            )
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(".gguf"):
                    continue
                path = Path(dirpath) / name
                try:
                    fst = path.stat()
                except OSError as exc:
                    signature.add((str(path), -1, -1))
                    if problems is not None:
                        reason = (
                            f"broken symlink to {os.readlink(path)}"
                            if path.is_symlink()
                            else f"cannot read: {exc.strerror}"
                        )
                        problems.append(ScanProblem(path, reason))
                    continue
                signature.add((str(path), fst.st_size, fst.st_mtime_ns))
                if problems is None:
                    continue
                if not stat.S_ISREG(fst.st_mode):  # a FIFO would block the reader forever
                    problems.append(ScanProblem(path, "not a regular file"))
                    continue
                hub = _hub_location(path)
                files.append(
                    _File(
                        path=path,
                        real=path.resolve(),
                        size=fst.st_size,
                        mtime_ns=fst.st_mtime_ns,
                        repo=hub[0] if hub else None,
                        repo_dir=hub[1] if hub else None,
                        revision=hub[2] if hub else None,
                        in_snapshot=hub[3] if hub else None,
                    )
                )
    return files, frozenset(signature)


def folder_signature(dirs: Iterable[Path]) -> Signature:
    """A cheap fingerprint of the folders' GGUF files (stat only, no file is opened).

    A watcher compares it with the last scan's to decide whether to rescan at all.
    """
    return _walk(dirs, None)[1]


def _newest_revisions(files: list[_File]) -> list[_File]:
    """Drop hub files shadowed by the same file in a preferred revision of the repo."""
    groups: dict[tuple[Path, str], list[_File]] = {}
    result: list[_File] = []
    for f in files:
        if f.repo_dir is None or f.in_snapshot is None:
            result.append(f)
        else:
            groups.setdefault((f.repo_dir, f.in_snapshot), []).append(f)
    refs: dict[Path, str | None] = {}
    for (repo_dir, _), group in groups.items():
        if repo_dir not in refs:
            try:
                refs[repo_dir] = (repo_dir / "refs" / "main").read_text().strip() or None
            except OSError:
                refs[repo_dir] = None
        main = refs[repo_dir]
        best = max(group, key=lambda f: (f.revision == main, f.mtime_ns, f.revision or ""))
        result.append(best)
    return result


# -- scanning ------------------------------------------------------------------------


def _is_mmproj_name(name: str) -> bool:
    return "mmproj" in name.lower()


def _is_other_companion(name: str) -> bool:
    lower = name.lower()
    return "imatrix" in lower or lower.startswith(_DRAFT_PREFIXES)


def _mmproj_rank(meta: GGUFMetadata) -> tuple[int, str]:
    precision = (meta.quantization or "").upper()
    if precision not in MMPROJ_PREFERENCE:
        found = _PRECISION_IN_NAME.search(meta.path.name)
        precision = found.group(1).upper() if found else ""
    rank = MMPROJ_PREFERENCE.index(precision) if precision in MMPROJ_PREFERENCE else 99
    return rank, meta.path.name


def _tag(stem: str) -> str | None:
    found = _TAG_RE.search(stem)
    return found.group(1).upper() if found else None


@dataclass(slots=True)
class _Candidate:
    """A model before it has its final id."""

    base: str
    label: str
    files: list[_File]
    metas: list[GGUFMetadata]

    @property
    def first(self) -> _File:
        return self.files[0]


def _read(f: _File, old: MetadataCache, new: MetadataCache) -> GGUFMetadata | str:
    key = (str(f.real), f.size, f.mtime_ns)
    found = old.get(key)
    if found is None:
        try:
            found = read_gguf_metadata(f.path)
        except GGUFError as exc:
            found = str(exc)
    new[key] = found
    return found


def scan_folders(
    dirs: Iterable[Path],
    *,
    exclude: Iterable[Path] = (),
    taken: Iterable[str] = (),
    previous_ids: Mapping[Path, str] | None = None,
    cache: MetadataCache | None = None,
    missing_ok: bool = False,
) -> ScanResult:
    """Scan ``dirs`` recursively and return the models found, with every problem.

    ``exclude``: files already served otherwise (manual models), left out. ``taken``:
    names (manual ids and aliases) no discovered model may use. ``previous_ids``: first
    shard -> id from the last scan, kept where possible. ``cache``: metadata from the
    last scan; unchanged files are not opened again. ``missing_ok``: a folder that does
    not exist (a default cache nothing was downloaded to yet) is not a problem.
    """
    problems: list[ScanProblem] = []
    old_cache = cache or {}
    new_cache: MetadataCache = {}
    files, signature = _walk(dirs, problems, missing_ok=missing_ok)
    files = _newest_revisions(files)
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    seen_real: set[Path] = set()
    unique: list[_File] = []
    for f in sorted(files, key=lambda f: str(f.path)):
        if f.real in excluded or f.real in seen_real:
            continue  # served by a manual entry, or the same blob reached twice
        seen_real.add(f.real)
        unique.append(f)

    candidates: list[_Candidate] = []
    mmprojs: dict[Path, list[GGUFMetadata]] = {}
    shards: dict[tuple[Path, str, int], dict[int, _File]] = {}
    for f in unique:
        name = f.path.name
        if _is_other_companion(name):
            logger.debug("catalog_skip path=%s reason=companion", f.path)
            continue
        split = SPLIT_RE.match(name)
        if split and not _is_mmproj_name(name):
            key = (f.path.parent, split["prefix"], int(split["count"]))
            shards.setdefault(key, {})[int(split["index"])] = f
            continue
        meta = _read(f, old_cache, new_cache)
        if isinstance(meta, str):
            problems.append(ScanProblem(f.path, meta))
            continue
        if _is_mmproj_name(name) or meta.gguf_type == "mmproj":
            mmprojs.setdefault(f.path.parent, []).append(meta)
            continue
        if meta.gguf_type != "model":
            logger.debug("catalog_skip path=%s reason=general.type=%s", f.path, meta.gguf_type)
            continue
        if meta.split_count and meta.split_count > 1:
            problems.append(
                ScanProblem(
                    f.path,
                    f"shard {(meta.split_no or 0) + 1} of a {meta.split_count}-part split "
                    "model, but the name lacks the -0000N-of-0000M suffix llama.cpp needs to "
                    "find the others",
                )
            )
            continue
        label = f.repo.replace("/", "-") if f.repo else f.path.parent.name
        candidates.append(_Candidate(name[: -len(".gguf")], label, [f], [meta]))

    for (folder, prefix, count), parts in sorted(shards.items(), key=lambda kv: str(kv[0])):
        candidate = _split_candidate(folder, prefix, count, parts, old_cache, new_cache, problems)
        if candidate is not None:
            candidates.append(candidate)

    best_mmproj = {folder: min(metas, key=_mmproj_rank).path for folder, metas in mmprojs.items()}
    models = _assign(candidates, best_mmproj, set(taken), previous_ids or {})
    for problem in problems:
        logger.warning("catalog_problem path=%s reason=%s", problem.path, problem.reason)
    return ScanResult(models, problems, signature, new_cache)


def _split_candidate(
    folder: Path,
    prefix: str,
    count: int,
    parts: dict[int, _File],
    old_cache: MetadataCache,
    new_cache: MetadataCache,
    problems: list[ScanProblem],
) -> _Candidate | None:
    """One candidate for a complete, readable split; a problem otherwise."""
    first_path = folder / f"{prefix}-{1:05d}-of-{count:05d}.gguf"
    missing = [i for i in range(1, count + 1) if i not in parts]
    if count < 1 or missing:
        listed = ", ".join(f"{i:05d}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(
            ScanProblem(
                first_path,
                f"incomplete split model: {len(parts)} of {count} shards present "
                f"(missing {listed}); not served until all are there",
            )
        )
        return None
    ordered = [parts[i] for i in range(1, count + 1)]
    metas: list[GGUFMetadata] = []
    for index, f in enumerate(ordered, start=1):
        meta = _read(f, old_cache, new_cache)
        if isinstance(meta, str):
            problems.append(ScanProblem(f.path, f"shard {index} of split model {prefix}: {meta}"))
            return None
        metas.append(meta)
    head = metas[0]
    if head.gguf_type != "model":
        return None
    if head.split_count is not None and head.split_count != count:
        problems.append(
            ScanProblem(
                first_path,
                f"split.count in the header is {head.split_count} but the names say {count}",
            )
        )
        return None
    first = ordered[0]
    label = first.repo.replace("/", "-") if first.repo else folder.name
    return _Candidate(prefix, label, ordered, metas)


def _mmproj_for(f: _File, best: Mapping[Path, Path]) -> Path | None:
    """The best projector in the model's folder. Inside a hub snapshot, the nearest one
    up to the snapshot root also counts: repos that keep each quantization in its own
    subfolder keep the projector at the top (llama.cpp's ``find_best_sibling`` looks
    there too)."""
    folder = f.path.parent
    for _ in range((f.in_snapshot or "").count("/") + 1):
        if folder in best:
            return best[folder]
        folder = folder.parent
    return None


def _assign(
    candidates: list[_Candidate],
    mmproj: Mapping[Path, Path],
    taken: set[str],
    previous_ids: Mapping[Path, str],
) -> list[CatalogModel]:
    """Give every candidate a unique id and its aliases, then build the models."""
    candidates.sort(key=lambda c: str(c.first.path))
    used = set(taken)
    ids: dict[int, str] = {}
    for i, c in enumerate(candidates):  # keep last scan's ids first, so names stay stable
        before = previous_ids.get(c.first.path)
        if before and before not in used:
            ids[i] = before
            used.add(before)
    for i, c in enumerate(candidates):
        if i in ids:
            continue
        choices = [c.base, f"{c.base}-{c.label}"]
        chosen = next((name for name in choices if name not in used), None)
        n = 2
        while chosen is None:
            if f"{c.base}-{n}" not in used:
                chosen = f"{c.base}-{n}"
            n += 1
        ids[i] = chosen
        used.add(chosen)

    wanted: dict[int, str] = {}
    alias_count: dict[str, int] = {}
    for i, c in enumerate(candidates):
        tag = _tag(c.base)
        if c.first.repo and tag:
            wanted[i] = f"{c.first.repo}:{tag}"
            alias_count[wanted[i]] = alias_count.get(wanted[i], 0) + 1

    models: list[CatalogModel] = []
    for i, c in enumerate(candidates):
        alias = wanted.get(i)
        aliases = (alias,) if alias and alias_count[alias] == 1 and alias not in used else ()
        head = c.metas[0]
        models.append(
            CatalogModel(
                id=ids[i],
                path=c.first.path,
                shards=tuple(f.path for f in c.files),
                size_bytes=sum(f.size for f in c.files),
                architecture=head.architecture,
                context_length=head.context_length,
                parameter_count=sum(m.parameter_count for m in c.metas),
                file_type=head.file_type,
                quantization=head.quantization,
                has_chat_template=head.has_chat_template,
                mmproj=_mmproj_for(c.first, mmproj),
                source="auto",
                aliases=aliases,
                repo=c.first.repo,
                name=head.name,
                kv_bytes_per_token=head.kv_bytes_per_token,
            )
        )
    return sorted(models, key=lambda m: m.id)


def scan(dirs: Iterable[Path]) -> list[CatalogModel]:
    """The models under ``dirs``; problems are logged. See :func:`scan_folders`."""
    return scan_folders(dirs).models


# -- manual models -------------------------------------------------------------------


def _mmproj_from_args(args: Sequence[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--mmproj" and i + 1 < len(args):
            return Path(args[i + 1]).expanduser()
        if arg.startswith("--mmproj="):
            return Path(arg.split("=", 1)[1]).expanduser()
    return None


def manual_model(model_id: str, config: ModelConfig) -> tuple[CatalogModel, ScanProblem | None]:
    """A config entry as a catalog model, with its file's metadata when it can be read.

    A manual model stays listed even when its file is missing or bad: the operator wrote
    it, so the problem is reported rather than the entry silently dropped. A model with a
    command template (``cmd``) names whatever its server takes as ``path``; only an
    existing GGUF file there is read (its size then feeds the memory check).
    """
    base = CatalogModel(
        id=model_id,
        path=config.path,
        source="manual",
        aliases=tuple(
            dict.fromkeys(
                [
                    *config.aliases,
                    *(n for n in (config.filters.set_params_by_name if config.filters else {})),
                ]
            )
        ),
        mmproj=_mmproj_from_args(config.args),
        config=config,
    )
    if config.path is None:
        return base, None
    path = config.path.expanduser()
    if config.cmd is not None and not (path.suffix.lower() == ".gguf" and path.is_file()):
        # a command template's model may be anything its server takes (a folder, a
        # Hugging Face repo id): only a GGUF file here has a header to read
        return replace(base, path=path), None
    shards = [path]
    split = SPLIT_RE.match(path.name)
    if split and int(split["index"]) == 1:
        count = int(split["count"])
        shards = [path.parent / f"{split['prefix']}-{i:05d}-of-{count:05d}.gguf"
                  for i in range(1, count + 1)]  # fmt: skip
    metas: list[GGUFMetadata] = []
    for shard in shards:
        try:
            metas.append(read_gguf_metadata(shard))
        except GGUFError as exc:
            where = f"models.{model_id}.path"
            return replace(base, shards=tuple(shards)), ScanProblem(shard, f"{where}: {exc}")
    head = metas[0]
    return (
        replace(
            base,
            path=path,
            shards=tuple(shards),
            size_bytes=sum(m.size_bytes for m in metas),
            architecture=head.architecture,
            context_length=head.context_length,
            parameter_count=sum(m.parameter_count for m in metas),
            file_type=head.file_type,
            quantization=head.quantization,
            has_chat_template=head.has_chat_template,
            name=head.name,
            kv_bytes_per_token=head.kv_bytes_per_token,
        ),
        None,
    )


# -- the catalog ---------------------------------------------------------------------


class Catalog:
    """Manual models from the config plus auto models found in folders.

    Not thread-safe by design: like all fleet state it lives on the event loop. The slow
    part, :meth:`scan_folders`, reads no mutable state but the metadata cache's current
    dict and changes none, so :func:`watch` runs it in a worker thread and applies the
    result on the loop with :meth:`apply`.
    """

    def __init__(
        self,
        dirs: Iterable[Path],
        manual: Mapping[str, ModelConfig] | None = None,
        *,
        missing_ok: bool = False,
    ) -> None:
        self.dirs: list[Path] = [Path(d).expanduser() for d in dirs]
        self.missing_ok = missing_ok
        """Whether a folder that does not exist is fine (the default caches) or a problem."""
        self._manual: dict[str, CatalogModel] = {}
        self._manual_problems: list[ScanProblem] = []
        for model_id, config in (manual or {}).items():
            model, problem = manual_model(model_id, config)
            self._manual[model_id] = model
            if problem is not None:
                self._manual_problems.append(problem)
        self._auto: dict[str, CatalogModel] = {}
        self._scan_problems: list[ScanProblem] = []
        self._signature: Signature | None = None
        self._cache: MetadataCache = {}

    def set_manual(self, manual: Mapping[str, ModelConfig]) -> list[str]:
        """Replace the manual models (a config reload); the ids added, removed or whose
        entry changed. Auto models stay until the next scan."""
        old = {i: m.config for i, m in self._manual.items()}
        self._manual, self._manual_problems = {}, []
        for model_id, config in manual.items():
            model, problem = manual_model(model_id, config)
            self._manual[model_id] = model
            if problem is not None:
                self._manual_problems.append(problem)
        ids = set(old) | set(manual)
        return sorted(i for i in ids if old.get(i) != manual.get(i))

    @classmethod
    def from_settings(cls, settings: Settings, dirs: Sequence[Path] | None = None) -> Catalog:
        """``dirs``, else the settings' ``models_dirs``, else the default caches (which
        may not exist yet: a watcher picks them up when they appear)."""
        chosen = list(dirs or settings.models_dirs)
        if chosen:
            return cls(chosen, settings.models)
        return cls(default_models_dirs(), settings.models, missing_ok=True)

    @property
    def models(self) -> list[CatalogModel]:
        """Every model, manual and auto, sorted by id."""
        return sorted([*self._manual.values(), *self._auto.values()], key=lambda m: m.id)

    @property
    def problems(self) -> list[ScanProblem]:
        """Why files (or manual entries) yield no usable model, as of the last scan."""
        return [*self._manual_problems, *self._scan_problems]

    def get(self, name: str) -> CatalogModel | None:
        """The model a request's ``model`` names, by id or alias."""
        found = self._manual.get(name) or self._auto.get(name)
        if found is not None:
            return found
        exact = next((m for m in self.models if name in m.aliases), None)
        if exact is not None:
            return exact
        return next((m for m in self.models if pattern_matches(name, m.aliases)), None)

    def scan_folders(self) -> ScanResult:
        """Scan the folders (slow: stats every file, reads new headers); changes nothing."""
        taken = {n for m in self._manual.values() for n in m.names}
        exclude = [p for m in self._manual.values() for p in m.shards]
        previous = {m.path: m.id for m in self._auto.values() if m.path is not None}
        return scan_folders(
            self.dirs,
            exclude=exclude,
            taken=taken,
            previous_ids=previous,
            cache=self._cache,
            missing_ok=self.missing_ok,
        )

    def apply(self, result: ScanResult) -> CatalogChange:
        """Replace the auto models with a scan's; manual models are left as they are."""
        new = {m.id: m for m in result.models}
        change = CatalogChange(
            added=[m for i, m in new.items() if i not in self._auto],
            removed=[m for i, m in self._auto.items() if i not in new],
            updated=[m for i, m in new.items() if i in self._auto and self._auto[i] != m],
        )
        self._auto = new
        self._scan_problems = list(result.problems)
        self._signature = result.signature
        self._cache = result.cache
        for m in change.added:
            logger.info("catalog_added id=%s path=%s", m.id, m.path)
        for m in change.removed:
            logger.info("catalog_removed id=%s path=%s", m.id, m.path)
        for m in change.updated:
            logger.info("catalog_updated id=%s path=%s", m.id, m.path)
        return change

    def rescan(self) -> CatalogChange:
        """Scan now and apply: new files are added, vanished ones removed."""
        return self.apply(self.scan_folders())

    def changed(self) -> bool:
        """Whether the folders' GGUF files differ from the last scan (stat only)."""
        return self._signature is None or folder_signature(self.dirs) != self._signature


async def watch(
    catalog: Catalog,
    *,
    interval: float = 5.0,
    on_change: Callable[[CatalogChange], object] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Rescan whenever the folders change, checking every ``interval`` seconds.

    Polling a stat signature rather than inotify works the same on every platform and
    on network file systems, and costs one ``stat`` per GGUF file per interval. The
    blocking work runs in a thread; the catalog is changed only here, on the loop.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            if await asyncio.to_thread(catalog.changed):
                change = catalog.apply(await asyncio.to_thread(catalog.scan_folders))
                if change and on_change is not None:
                    on_change(change)
        except Exception:  # a watcher that dies silently is worse than one that logs
            logger.exception("catalog_watch_failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
