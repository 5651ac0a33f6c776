"""Where GGUF files are: the default model folders (llama.cpp's cache and the Hugging
Face hub cache) and one walk below a set of folders, hub snapshots resolved to their
blobs, with a stat signature that says whether anything changed.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.catalog.model import ScanProblem, Signature


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


@dataclass(frozen=True, slots=True)
class FoundFile:
    path: Path
    real: Path
    size: int
    mtime_ns: int
    repo: str | None = None
    repo_dir: Path | None = None
    revision: str | None = None
    in_snapshot: str | None = None
    """Path inside the hub snapshot (``sub/name.gguf``): equal across revisions."""


def hub_location(path: Path) -> tuple[str, Path, str, str] | None:
    """``(ORG/NAME, repo folder, revision, path in snapshot)`` for a hub-cache file."""
    parts = path.parts
    for i in range(len(parts) - 3, -1, -1):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = parts[i].removeprefix("models--").replace("--", "/")
            return repo, Path(*parts[: i + 1]), parts[i + 2], "/".join(parts[i + 3 :])
    return None


def walk(
    dirs: Iterable[Path], problems: list[ScanProblem] | None, *, missing_ok: bool = False
) -> tuple[list[FoundFile], Signature]:
    """Every ``*.gguf`` below ``dirs`` (symlinks followed, each folder once), stat'ed.

    With ``problems`` ``None`` only the signature is wanted: nothing is resolved or
    collected. Hidden entries are skipped: the hub cache keeps empty
    ``.no_exist/<rev>/x.gguf`` markers there, and writers keep temporary files there.
    """
    files: list[FoundFile] = []
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
                hub = hub_location(path)
                files.append(
                    FoundFile(
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
    return walk(dirs, None)[1]


def newest_revisions(files: list[FoundFile]) -> list[FoundFile]:
    """Drop hub files shadowed by the same file in a preferred revision of the repo."""
    groups: dict[tuple[Path, str], list[FoundFile]] = {}
    result: list[FoundFile] = []
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
