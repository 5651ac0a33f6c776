"""Download GGUF models from the Hugging Face hub into its cache (``corral models pull``).

``ORG/REPO[:QUANT]`` means what it means to llama.cpp's ``-hf``: the repo's GGUF whose
name carries the quantization tag ``QUANT`` (any case), with every shard of a split
model and the repo's best ``mmproj`` projector. The files go into the Hugging Face hub
cache (:func:`~corral.catalog.folders.hf_hub_cache_dir`, so ``HF_HOME`` and
``HF_HUB_CACHE`` count) through ``huggingface_hub`` itself: the same layout, locks and
resumable temporary files as every other hub client, and the cache corral's discovery
already scans. Nothing here keeps a catalog of its own.

Choosing files (:func:`select_files`, pure, so its rules are tested without a hub)
---------------------------------------------------------------------------------
* Model files are ``*.gguf`` that discovery would serve as models: no ``mmproj``,
  ``imatrix`` or draft-head (``mtp-``, ``eagle3-`` ...) files. A split model
  (``name-00001-of-00003.gguf`` ...) is one model of all its shards.
* ``QUANT`` matches a model whose path holds it as a word: preceded by no letter or
  digit and followed by ``.``, ``-`` or ``/`` (so ``Q4_K_M`` finds
  ``Model-Q4_K_M.gguf`` and ``Q4_K_M/Model-Q4_K_M-00001-of-00002.gguf``, and
  ``UD-Q4_K_XL`` finds ``Model-UD-Q4_K_XL.gguf``). A ``QUANT`` equal to a model's file
  name (with or without ``.gguf``) picks that model.
* Without ``QUANT``: ``Q4_K_M``, else ``Q8_0``, else the first model by name, the
  order llama.cpp's ``find_best_model`` uses.
* More than one match is an error that names each candidate by the spec that picks it;
  none lists the quantizations the repo has.
* The projector: among ``*mmproj*.gguf`` in the model's folder or one above it (the
  folders discovery looks in), the nearest, then BF16, F16, F32 by name, then any
  other; the rule discovery attaches projectors by.

Errors are :class:`PullError`, one line each, naming the hub endpoint where it matters.
The token (``--token``, else ``HF_TOKEN``, else the one ``hf auth login`` stored) goes
only to huggingface_hub; no message or log line carries it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2  # huggingface_hub's HTTP client: its transport errors mean "unreachable"
from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from corral.catalog.discovery import scan_folders
from corral.catalog.files import (
    MMPROJ_PREFERENCE,
    PRECISION_IN_NAME,
    SPLIT_RE,
    file_tag,
    is_mmproj_name,
    is_other_companion,
)
from corral.catalog.folders import default_models_dirs, hf_hub_cache_dir
from corral.catalog.model import CatalogModel, ScanProblem

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_QUANTS",
    "PullError",
    "PullPlan",
    "PullResult",
    "Selection",
    "download",
    "hub_endpoint",
    "parse_spec",
    "plan_pull",
    "pull",
    "select_files",
    "served_as",
]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
"""The hub, unless ``HF_ENDPOINT`` names a mirror (or a test's fake)."""

DEFAULT_QUANTS: tuple[str, ...] = ("Q4_K_M", "Q8_0")
"""Tried in order when the spec names no quantization (llama.cpp's ``find_best_model``)."""

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for the hub's file listing (``HF_HUB_ETAG_TIMEOUT`` overrides it)."""

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
"""The hub's repo id rules: ``ORG/NAME`` of letters, digits, ``_.-``; no ``--`` or ``..``."""


class PullError(Exception):
    """Why a pull failed, as one line for the user (never holding the token)."""


# -- the spec ------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``ORG/REPO[:QUANT]`` -> ``(repo, quant or None)``; :class:`ValueError` if malformed."""
    repo, sep, quant = spec.strip().partition(":")
    if sep and not quant:
        raise ValueError(f"{spec!r}: nothing after ':' (expected ORG/REPO[:QUANT])")
    if ":" in quant or "/" in quant or "\\" in quant:
        raise ValueError(f"{spec!r}: QUANT is a tag like Q4_K_M (expected ORG/REPO[:QUANT])")
    if not _REPO_RE.match(repo) or "--" in repo or ".." in repo:
        raise ValueError(
            f"{spec!r} is not a Hugging Face repo (expected ORG/REPO[:QUANT], e.g. "
            "ggml-org/gemma-3-1b-it-GGUF:Q4_K_M)"
        )
    return repo, quant or None


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` (read now, not at import as huggingface_hub does), else the hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


# -- choosing files ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RepoModel:
    """One model in a repo's file list: a GGUF, or all shards of a split one."""

    shards: tuple[str, ...]
    expected: int
    """How many shards the names say there are (1 for a single file)."""

    @property
    def first(self) -> str:
        return self.shards[0]

    @property
    def stem(self) -> str:
        """The file name without ``.gguf`` and split suffix: discovery's model id."""
        name = PurePosixPath(self.first).name
        split = SPLIT_RE.match(name)
        return split["prefix"] if split else name[: -len(".gguf")]

    @property
    def tag(self) -> str:
        """The quantization as llama.cpp reads it from the name, else the name itself."""
        return file_tag(self.stem) or self.stem


@dataclass(frozen=True, slots=True)
class Selection:
    """The files one pull downloads: a model (every shard, in order) and a projector."""

    model: tuple[str, ...]
    mmproj: str | None
    tag: str
    """The model's quantization tag (``Q4_K_M``), the ``TAG`` of its ``ORG/REPO:TAG`` alias."""

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.model, self.mmproj) if self.mmproj else self.model


def _safe(name: str) -> bool:
    """A repo path that stays inside the snapshot folder (the listing is not trusted)."""
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and not path.is_absolute() and ".." not in path.parts


def _repo_models(files: Iterable[str]) -> list[_RepoModel]:
    singles: list[_RepoModel] = []
    splits: dict[tuple[str, str, int], dict[int, str]] = {}
    for name in files:
        base = PurePosixPath(name).name
        if not base.lower().endswith(".gguf") or not _safe(name) or base.startswith("."):
            continue
        if is_mmproj_name(base) or is_other_companion(base):
            continue
        split = SPLIT_RE.match(base)
        if split is None:
            singles.append(_RepoModel((name,), 1))
            continue
        folder = str(PurePosixPath(name).parent)
        key = (folder, split["prefix"], int(split["count"]))
        splits.setdefault(key, {})[int(split["index"])] = name
    models = list(singles)
    for (_, _, count), parts in splits.items():
        models.append(_RepoModel(tuple(parts[i] for i in sorted(parts)), count))
    return sorted(models, key=lambda m: m.first)


def _matches(model: _RepoModel, quant: str) -> bool:
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?=[.\-/])"
    return re.search(pattern, model.first, re.IGNORECASE) is not None


def _by_name(model: _RepoModel, quant: str) -> bool:
    wanted = quant.lower().removesuffix(".gguf")
    return wanted in (model.stem.lower(), PurePosixPath(model.first).name.lower()[:-5])


def _pick_mmproj(files: Iterable[str], model: str) -> str | None:
    """The nearest projector at or above the model's folder; then BF16, F16, F32."""
    folder = PurePosixPath(model).parent
    above = [folder, *folder.parents]
    best: tuple[int, int, str] | None = None
    for name in files:
        path = PurePosixPath(name)
        if not name.lower().endswith(".gguf") or not _safe(name) or path.name.startswith("."):
            continue
        if not is_mmproj_name(path.name) or path.parent not in above:
            continue
        found = PRECISION_IN_NAME.search(path.name)
        precision = found.group(1).upper() if found else ""
        rank = MMPROJ_PREFERENCE.index(precision) if precision in MMPROJ_PREFERENCE else 99
        key = (above.index(path.parent), rank, name)
        if best is None or key < best:
            best = key
    return best[2] if best else None


def select_files(
    files: Iterable[str], quant: str | None, *, repo: str, mmproj: bool = True
) -> Selection:
    """Which of a repo's ``files`` a pull of ``repo:quant`` downloads (module docstring).

    Raises :class:`PullError` when the repo has no GGUF model, when ``quant`` matches none
    (listing the quantizations there are) or more than one (naming each), and when the
    chosen split model is missing shards in the listing.
    """
    files = list(files)
    models = _repo_models(files)
    if not models:
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        if ggufs:
            what = f"only projectors or companions ({', '.join(ggufs[:5])})"
        else:
            what = f"none among its {len(files)} file(s)"
        raise PullError(f"{repo} has no GGUF model files: {what}; corral serves GGUF models")
    chosen: _RepoModel | None = None
    if quant is not None:
        exact = [m for m in models if _by_name(m, quant)]
        candidates = exact or [m for m in models if _matches(m, quant)]
        if not candidates:
            available = ", ".join(dict.fromkeys(m.tag for m in models))
            raise PullError(f"{repo} has no {quant} model; available: {available}")
    else:
        candidates = []
        for default in DEFAULT_QUANTS:
            candidates = [m for m in models if _matches(m, default)]
            if candidates:
                quant = default
                break
        else:
            chosen = models[0]
    if chosen is None:
        if len(candidates) > 1:
            named = ", ".join(f"{repo}:{m.stem} ({m.first})" for m in candidates)
            raise PullError(
                f"{quant} matches {len(candidates)} models in {repo}; pick one: {named}"
            )
        chosen = candidates[0]
    if len(chosen.shards) != chosen.expected:
        raise PullError(
            f"{repo}: split model {chosen.stem} lists {len(chosen.shards)} of "
            f"{chosen.expected} shards; it cannot be served incomplete"
        )
    projector = _pick_mmproj(files, chosen.first) if mmproj else None
    return Selection(model=chosen.shards, mmproj=projector, tag=chosen.tag)


# -- the hub -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullPlan:
    """What a pull will download, from the repo's file listing at ``revision``."""

    repo: str
    revision: str
    commit: str | None
    selection: Selection
    sizes: Mapping[str, int] = field(default_factory=dict)
    """Bytes per file, where the listing says."""
    endpoint: str = DEFAULT_ENDPOINT

    @property
    def files(self) -> tuple[str, ...]:
        return self.selection.files

    @property
    def size_bytes(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.files)


@dataclass(frozen=True, slots=True)
class PullResult:
    plan: PullPlan
    paths: tuple[Path, ...]
    """The snapshot paths of :attr:`PullPlan.files`, in the same order."""
    model: CatalogModel | None
    """The model as discovery names it (``None`` if the scan did not yield it)."""
    problem: ScanProblem | None = None
    """Why the scan did not yield it (a file corral cannot serve)."""

    @property
    def path(self) -> Path:
        """The model's file (a split model's first shard): llama-server's ``--model``."""
        return self.paths[0]


def _explain(exc: Exception, repo: str, revision: str, endpoint: str, token: str | None) -> str:
    """One line for a huggingface_hub failure; the token is never part of it."""
    login = "pass --token or set HF_TOKEN"
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the hub is not asked; unset it to pull"
    if isinstance(exc, httpx2.TimeoutException):
        return f"could not reach the Hugging Face hub at {endpoint}: it did not answer in time"
    if isinstance(exc, httpx2.TransportError):
        reason = str(exc) or type(exc).__name__
        return f"could not reach the Hugging Face hub at {endpoint}: {reason}"
    if isinstance(exc, GatedRepoError):
        status = exc.response.status_code
        if token:
            return (
                f"{repo} is gated and this token has no access ({status}): accept its terms "
                f"at {endpoint}/{repo} with the account the token belongs to"
            )
        return f"{repo} is gated ({status}): accept its terms at {endpoint}/{repo}, then {login}"
    if isinstance(exc, RepositoryNotFoundError):
        hint = "or the token cannot see it" if token else f"or it is private: {login}"
        return f"repository {repo} not found at {endpoint} ({hint})"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo} at {endpoint}"
    if isinstance(exc, DisabledRepoError):
        return f"{repo} is disabled at {endpoint}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{repo} at {endpoint} listed a file it then did not have; try again"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        message = (exc.server_message or "").strip().splitlines() or [str(status)]
        if status == 401:
            return f"the hub at {endpoint} refused the token (401: {message[0]})"
        return f"the hub at {endpoint} answered {status} for {repo}: {message[0]}"
    if isinstance(exc, LocalEntryNotFoundError):
        cause = exc.__cause__
        if isinstance(cause, httpx2.TransportError | OfflineModeIsEnabled):
            return _explain(cause, repo, revision, endpoint, token)
        return f"could not download from the Hugging Face hub at {endpoint}: {exc}"
    return f"pulling {repo} from {endpoint} failed: {exc}"


def _token(token: str | None) -> str | None:
    """The token huggingface_hub will send: the given one, else ``HF_TOKEN``, else login."""
    return token or get_token()


def plan_pull(
    repo: str,
    quant: str | None,
    *,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    mmproj: bool = True,
    timeout: float | None = None,
) -> PullPlan:
    """Ask the hub for ``repo``'s files at ``revision`` and choose what to download."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    token = _token(token)
    if timeout is None:
        timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=timeout)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise PullError(_explain(exc, repo, revision, endpoint, token)) from exc
    siblings = info.siblings or []
    selection = select_files((s.rfilename for s in siblings), quant, repo=repo, mmproj=mmproj)
    sizes = {s.rfilename: s.size for s in siblings if s.size is not None}
    return PullPlan(repo, revision, info.sha, selection, sizes, endpoint)


def _named_bar(base: Any, name: str) -> Any:
    """``base`` labelled with the file name: huggingface_hub labels a plain HTTP download
    with the tail of its (CDN) URL."""

    class NamedBar(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["desc"] = name
            super().__init__(*args, **kwargs)

    return NamedBar


def download(
    plan: PullPlan,
    *,
    cache_dir: Path | None = None,
    token: str | None = None,
    on_file: Callable[[int, str, int | None], object] | None = None,
    tqdm_class: Any = None,
) -> tuple[Path, ...]:
    """Download the plan's files into the hub cache; their snapshot paths, in order.

    ``on_file(index, name, size)`` is called before each file; ``tqdm_class`` replaces
    huggingface_hub's own byte progress bar (shown on a terminal, silent otherwise).
    Files already in the cache at the same commit are not downloaded again.
    """
    cache = Path(cache_dir) if cache_dir is not None else hf_hub_cache_dir()
    token = _token(token)
    paths: list[Path] = []
    for index, name in enumerate(plan.files):
        if on_file is not None:
            on_file(index, name, plan.sizes.get(name))
        try:
            local = hf_hub_download(
                plan.repo,
                name,
                revision=plan.revision,
                cache_dir=cache,
                endpoint=plan.endpoint,
                token=token or False,
                tqdm_class=_named_bar(tqdm_class or hf_tqdm, PurePosixPath(name).name),
            )
        except (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            httpx2.TransportError,
        ) as exc:
            raise PullError(_explain(exc, plan.repo, plan.revision, plan.endpoint, token)) from exc
        except OSError as exc:  # disk full, permissions, a size that did not match
            raise PullError(f"could not write {name} into {cache}: {exc}") from exc
        paths.append(Path(str(local)))
        logger.info("pull_file repo=%s file=%s path=%s", plan.repo, name, local)
    return tuple(paths)


def served_as(
    path: Path, dirs: Sequence[Path], repo: str | None = None
) -> tuple[CatalogModel | None, ScanProblem | None]:
    """The model (or the problem) a scan of ``dirs`` finds for the file at ``path``.

    Paths are compared by their folder's real path and their name (the file itself is a
    symlink into ``blobs/``). When another revision's copy of the same file shadows this
    one (discovery prefers ``refs/main``), that model is the answer: it is what is served.
    """
    result = scan_folders(dirs, missing_ok=True)

    def same(other: Path | None) -> bool:
        return (
            other is not None
            and other.name == path.name
            and other.parent.resolve() == path.parent.resolve()
        )

    model = next((m for m in result.models if same(m.path)), None)
    if model is None and repo is not None:
        model = next(
            (m for m in result.models if m.repo == repo and m.path and m.path.name == path.name),
            None,
        )
    if model is not None:
        return model, None
    return None, next((p for p in result.problems if same(p.path)), None)


def pull(
    spec: str,
    *,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    mmproj: bool = True,
    cache_dir: Path | None = None,
    on_plan: Callable[[PullPlan], object] | None = None,
    on_file: Callable[[int, str, int | None], object] | None = None,
    tqdm_class: Any = None,
    timeout: float | None = None,
) -> PullResult:
    """Plan, download and name one model: ``corral models pull SPEC``.

    The name comes from a scan of the folders ``corral serve`` searches by default (the
    llama.cpp cache and the hub cache), or of ``cache_dir`` alone when one is given:
    the id a fresh scan gives (a running server keeps ids it gave earlier).
    """
    try:
        repo, quant = parse_spec(spec)
    except ValueError as exc:
        raise PullError(str(exc)) from exc
    plan = plan_pull(
        repo, quant, revision=revision, token=token, endpoint=endpoint, mmproj=mmproj,
        timeout=timeout,
    )  # fmt: skip
    if on_plan is not None:
        on_plan(plan)
    paths = download(plan, cache_dir=cache_dir, token=token, on_file=on_file, tqdm_class=tqdm_class)
    dirs = [Path(cache_dir)] if cache_dir is not None else default_models_dirs()
    model, problem = served_as(paths[0], dirs, plan.repo)
    return PullResult(plan, paths, model, problem)
