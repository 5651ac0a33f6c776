"""Which accelerator backend llama-server is built for: detected from a made-up
machine, chosen by ``install --backend``, cached per backend, and what a missing
toolkit says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.supervisor.binary import (
    BACKENDS,
    InstallError,
    LlamaServerNotFound,
    backend_of,
    cached_binary,
    check_backend_tools,
    choose_backend,
    detect_backend,
    find_llama_server,
)


def machine(tmp_path: Path, *paths: str) -> Path:
    """A root with these files or folders (a trailing / makes a folder)."""
    root = tmp_path / "root"
    root.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = root / path.rstrip("/")
        if path.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("")
    return root


def tool(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


#: No toolkit anywhere (this machine may have one in /usr/local/cuda).
NONE = {"PATH": "", "CUDA_HOME": "/nonexistent"}


def test_detection_follows_the_gpu_and_its_toolkit(tmp_path: Path) -> None:
    bare = machine(tmp_path)
    assert detect_backend(NONE, "linux", bare).backend == "cpu"
    assert detect_backend(NONE, "darwin", bare).backend == "metal"
    # an NVIDIA GPU: CUDA with nvcc, else CPU saying what is missing
    nvidia = machine(tmp_path, "proc/driver/nvidia/")
    without = detect_backend(NONE, "linux", nvidia)
    assert without.backend == "cpu" and "nvcc" in without.why
    nvcc = tool(tmp_path / "cuda" / "bin", "nvcc")
    found = detect_backend({**NONE, "PATH": str(nvcc.parent)}, "linux", nvidia)
    assert found.backend == "cuda" and str(nvcc) in found.why
    home = detect_backend({**NONE, "CUDA_HOME": str(tmp_path / "cuda")}, "linux", nvidia)
    assert home.backend == "cuda"
    # an AMD GPU: ROCm with hipconfig
    amd = machine(tmp_path / "amd", "dev/kfd")
    hip = tool(tmp_path / "rocm", "hipconfig")
    assert detect_backend({**NONE, "PATH": str(hip.parent)}, "linux", amd).backend == "rocm"
    assert detect_backend(NONE, "linux", amd).backend == "cpu"
    # any other GPU: Vulkan, when its build tools are all there
    gpu = machine(tmp_path / "gpu", "dev/dri/renderD128", "usr/include/vulkan/vulkan.h")
    glslc = tool(tmp_path / "vk", "glslc")
    vk = {**NONE, "PATH": str(glslc.parent)}
    assert detect_backend(vk, "linux", gpu).backend == "cpu"  # no SPIR-V headers yet
    machine(tmp_path / "gpu", "usr/include/spirv/")
    assert detect_backend(vk, "linux", gpu).backend == "vulkan"


def test_a_missing_toolkit_is_one_line_naming_it_and_the_ways_out(tmp_path: Path) -> None:
    bare = machine(tmp_path)
    with pytest.raises(InstallError) as cuda:
        check_backend_tools("cuda", NONE, "linux", bare)
    assert "nvcc" in str(cuda.value) and "--backend cpu" in str(cuda.value)
    assert "--llama-server" in str(cuda.value) and "\n" not in str(cuda.value)
    with pytest.raises(InstallError, match=r"glslc .*libvulkan-dev.*spirv-headers"):
        check_backend_tools("vulkan", NONE, "linux", bare)
    with pytest.raises(InstallError, match="hipconfig"):
        check_backend_tools("rocm", NONE, "linux", bare)
    with pytest.raises(InstallError, match="macOS"):
        check_backend_tools("metal", NONE, "linux", bare)
    check_backend_tools("cpu", NONE, "linux", bare)  # nothing to need


def test_each_backend_has_its_cache_and_the_chosen_one_is_found(tmp_path: Path) -> None:
    environ = {"CORRAL_CACHE_DIR": str(tmp_path), "PATH": ""}
    folders = {
        cached_binary(environ={**environ, "CORRAL_LLAMA_SERVER_BACKEND": b}).parent.name
        for b in BACKENDS
    }
    assert len(folders) == len(BACKENDS)
    cpu = cached_binary(environ=environ)
    assert cpu.parent.name.startswith("b") and "-" not in cpu.parent.name
    cuda_env = {**environ, "CORRAL_LLAMA_SERVER_BACKEND": "cuda"}
    cuda = cached_binary(environ=cuda_env)
    for path in (cpu, cuda):
        path.parent.mkdir(parents=True)
        path.write_text("")
        path.chmod(0o755)
    assert find_llama_server(None, environ).path == cpu
    choose_backend("cuda", environ)  # what `install --backend cuda` leaves
    assert backend_of(environ) == "cuda"
    assert find_llama_server(None, environ).path == cuda
    # the variable wins over the choice
    assert find_llama_server(None, {**environ, "CORRAL_LLAMA_SERVER_BACKEND": "cpu"}).path == cpu
    choose_backend("cpu", environ)
    assert find_llama_server(None, environ).path == cpu
    with pytest.raises(LlamaServerNotFound, match="the backends are"):
        find_llama_server(None, {**environ, "CORRAL_LLAMA_SERVER_BACKEND": "tpu"})


def test_install_says_the_backend_and_a_missing_toolkit_fails_before_any_build(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "CORRAL_CACHE_DIR": str(tmp_path), "PATH": os.path.dirname(sys.executable)}
    env["CUDA_HOME"] = "/nonexistent"  # this machine may have /usr/local/cuda
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "llama-server", "install", "--backend", "cuda"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "llama-server install: backend cuda" in result.stderr
    assert "the cuda backend needs the CUDA toolkit's nvcc" in result.stderr
    assert not (tmp_path / "downloads").exists()  # nothing was fetched or built


def test_the_source_unpacks_safely_on_a_python_without_tar_filters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's Python 3.11.2 has no ``tarfile.data_filter``: the same refusals by
    hand (a member that would land outside, a link), the rest unpacked."""
    import io
    import tarfile

    from corral.supervisor import binary

    def archive(*names: str, link: bool = False) -> tarfile.TarFile:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as out:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 2
                out.addfile(info, io.BytesIO(b"ok"))
            if link:
                info = tarfile.TarInfo("pkg/escape")
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                out.addfile(info)
        buffer.seek(0)
        return tarfile.open(fileobj=buffer)

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    binary._extract(archive("pkg/a.txt", "pkg/sub/b.txt"), tmp_path / "good")
    assert (tmp_path / "good" / "pkg" / "sub" / "b.txt").read_bytes() == b"ok"
    with pytest.raises(binary.InstallError, match="refusing"):
        binary._extract(archive("../outside.txt"), tmp_path / "bad")
    assert not (tmp_path / "outside.txt").exists()
    with pytest.raises(binary.InstallError, match="refusing"):
        binary._extract(archive("pkg/a.txt", link=True), tmp_path / "link")
