"""Pure parts of the supervisor: the flag deny-list, the log ring, log rotation."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from corral.supervisor import process
from corral.supervisor.flags import DENIED, FlagError, check_llama_args
from corral.supervisor.managed import check_reserved, static_path_args
from corral.supervisor.process import LogRing


def test_ordinary_llama_server_arguments_pass() -> None:
    args = ["--parallel", "4", "--ctx-size=8192", "-fa", "on", "--metrics"]
    assert check_llama_args(args) == args


@pytest.mark.parametrize(
    "flag",
    [
        "--host",
        "--port",
        "--model",
        "-m",
        "--api-key",
        "--slot-save-path",
        "--lora",
        "-hf",
        "--path",
    ],
)
def test_address_model_secret_and_file_flags_are_refused_with_a_reason(flag: str) -> None:
    with pytest.raises(FlagError) as caught:
        check_llama_args(["--parallel", "2", flag, "x"])
    assert flag in str(caught.value)
    assert DENIED[flag] in str(caught.value)


def test_flag_with_equals_is_refused_too() -> None:
    with pytest.raises(FlagError, match="--port"):
        check_llama_args(["--port=9999"])


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(FlagError) as caught:
        check_llama_args(["--host", "0.0.0.0", 7, "a\x00b"])
    message = str(caught.value)
    assert "--host" in message and "argument 2 must be a string" in message
    assert "NUL" in message


def test_command_line_may_not_repeat_what_corral_sets() -> None:
    check_reserved(["--parallel", "4", "--mmproj", "p.gguf"])  # local CLI may pass files
    with pytest.raises(ValueError, match="--port"):
        check_reserved(["--port", "1"])


def test_log_ring_keeps_the_last_lines_and_a_cursor() -> None:
    ring = LogRing(3)
    for n in range(5):
        ring.append(f"line {n}")
    assert ring.tail(2) == ["line 3", "line 4"]
    assert ring.tail(0) == []
    assert ring.since(3) == (["line 3", "line 4"], 5)
    # lines that already fell out of the ring are skipped, not repeated
    assert ring.since(0) == (["line 2", "line 3", "line 4"], 5)
    assert ring.since(5) == ([], 5)


def test_large_log_files_are_rotated_keeping_a_bounded_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "LOG_ROTATE_BYTES", 10)
    monkeypatch.setattr(process, "LOG_FILES_KEPT", 2)
    log = tmp_path / "m.log"
    for n in range(4):
        log.write_text(f"run {n} " * 5)
        process._rotate(log)
    assert not log.exists()
    assert (tmp_path / "m.log.1").read_text().startswith("run 3")
    assert (tmp_path / "m.log.2").read_text().startswith("run 2")
    assert not (tmp_path / "m.log.3").exists()


def test_small_log_files_are_not_rotated(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_text("short\n")
    process._rotate(log)
    assert log.read_text() == "short\n"


def test_port_leases_never_hand_out_the_same_port_twice(tmp_path: Path) -> None:
    ports = range(23100, 23110)  # below the ephemeral range, so rarely in use
    first = process.lease_port(ports, tmp_path)
    second = process.lease_port(ports, tmp_path)  # nothing listens yet: only the lock
    assert first.port != second.port
    first.release()
    third = process.lease_port(ports, tmp_path)
    assert third.port == first.port  # a released port is free again
    second.release()
    third.release()


def test_port_lease_fails_clearly_when_the_range_is_exhausted(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ports = range(port, port + 1)
    held = process.lease_port(ports, tmp_path)
    with pytest.raises(RuntimeError, match=f"no free port in {port}-{port}"):
        process.lease_port(ports, tmp_path)
    held.release()


def test_static_path_is_the_ui_beside_the_binary_unless_the_user_chose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLAMA_ARG_STATIC_PATH", raising=False)
    binary = tmp_path / "llama-server"
    assert static_path_args(binary, []) == []  # no UI built
    (tmp_path / "ui").mkdir()
    (tmp_path / "ui" / "index.html").write_text("<html></html>")
    assert static_path_args(binary, ["-c", "4096"]) == ["--path", str(tmp_path / "ui")]
    assert static_path_args(binary, ["--path", "/srv/ui"]) == []
    assert static_path_args(binary, ["--path=/srv/ui"]) == []
    assert static_path_args(binary, ["--no-webui"]) == []
    assert static_path_args(binary, [], {"LLAMA_ARG_STATIC_PATH": "/srv/ui"}) == []
    monkeypatch.setenv("LLAMA_ARG_STATIC_PATH", "/srv/ui")  # corral's own environment
    assert static_path_args(binary, []) == []
