"""The command line: help, config commands, locating llama-server, the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import main
from corral.supervisor.binary import LlamaServerNotFound, cached_binary, find_llama_server


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


def test_llama_server_path_command_fails_clearly_when_missing(tmp_path: Path) -> None:
    result = run_cli(
        "llama-server",
        "path",
        env={"CORRAL_CACHE_DIR": str(tmp_path), "PATH": os.path.dirname(sys.executable)},
    )
    assert result.returncode == 1
    assert "corral llama-server install" in result.stderr


def test_install_returns_the_cached_binary_at_once(tmp_path: Path) -> None:
    environ = {"CORRAL_CACHE_DIR": str(tmp_path)}
    cached = make_executable(cached_binary(environ=environ))
    result = run_cli("llama-server", "install", env=environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(cached)
    assert "cached" in result.stderr


def test_make_tiny_writes_a_gguf(tmp_path: Path) -> None:
    target = tmp_path / "m" / "tiny.gguf"
    result = run_cli("models", "make-tiny", str(target), "--n-embd", "32", "--n-layer", "1")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes()[:4] == b"GGUF"
