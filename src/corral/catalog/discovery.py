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

Headers are read by :mod:`corral.catalog.gguf_header` (fast: it skips arrays), the
folders walked by :mod:`corral.catalog.folders`, file names read by
:mod:`corral.catalog.files`; the :class:`~corral.catalog.catalog.Catalog` holds the
result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from corral.catalog.files import SPLIT_RE, file_tag, is_mmproj_name, is_other_companion, mmproj_rank
from corral.catalog.folders import FoundFile, newest_revisions, walk
from corral.catalog.gguf_header import GGUFError, GGUFMetadata, WeightLayout, read_gguf_metadata
from corral.catalog.model import CatalogModel, MetadataCache, ScanProblem, ScanResult

if TYPE_CHECKING:
    from corral.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Candidate:
    """A model before it has its final id."""

    base: str
    label: str
    files: list[FoundFile]
    metas: list[GGUFMetadata]

    @property
    def first(self) -> FoundFile:
        return self.files[0]


def _read(f: FoundFile, old: MetadataCache, new: MetadataCache) -> GGUFMetadata | str:
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
    files, signature = walk(dirs, problems, missing_ok=missing_ok)
    files = newest_revisions(files)
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    seen_real: set[Path] = set()
    unique: list[FoundFile] = []
    for f in sorted(files, key=lambda f: str(f.path)):
        if f.real in excluded or f.real in seen_real:
            continue  # served by a manual entry, or the same blob reached twice
        seen_real.add(f.real)
        unique.append(f)

    candidates: list[_Candidate] = []
    mmprojs: dict[Path, list[GGUFMetadata]] = {}
    shards: dict[tuple[Path, str, int], dict[int, FoundFile]] = {}
    for f in unique:
        name = f.path.name
        if is_other_companion(name):
            logger.debug("catalog_skip path=%s reason=companion", f.path)
            continue
        split = SPLIT_RE.match(name)
        if split and not is_mmproj_name(name):
            key = (f.path.parent, split["prefix"], int(split["count"]))
            shards.setdefault(key, {})[int(split["index"])] = f
            continue
        meta = _read(f, old_cache, new_cache)
        if isinstance(meta, str):
            problems.append(ScanProblem(f.path, meta))
            continue
        if is_mmproj_name(name) or meta.gguf_type == "mmproj":
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

    best_mmproj = {folder: min(metas, key=mmproj_rank).path for folder, metas in mmprojs.items()}
    models = _assign(candidates, best_mmproj, set(taken), previous_ids or {})
    for problem in problems:
        logger.warning("catalog_problem path=%s reason=%s", problem.path, problem.reason)
    return ScanResult(models, problems, signature, new_cache)


def _split_candidate(
    folder: Path,
    prefix: str,
    count: int,
    parts: dict[int, FoundFile],
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


def weight_layout(metas: Sequence[GGUFMetadata]) -> WeightLayout | None:
    """The tensor layout of a model from its shards' headers (None if none says)."""
    layout = None
    for meta in metas:
        if meta.weights is not None:
            layout = meta.weights if layout is None else layout.merged(meta.weights)
    return layout


def _mmproj_for(f: FoundFile, best: Mapping[Path, Path]) -> Path | None:
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
        tag = file_tag(c.base)
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
                weights=weight_layout(c.metas),
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
            weights=weight_layout(metas),
        ),
        None,
    )
