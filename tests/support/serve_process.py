"""``corral serve`` started as its own process, as a user starts it, for real-tier tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.waiting import wait_until


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    base: str
    management: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_serve(
    tmp: Path,
    llama_server: Path,
    model: Path,
    token: str,
    *,
    serve_args: Sequence[str] = (),
    llama_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """``corral serve --model MODEL [SERVE_ARGS] -- [LLAMA_ARGS]`` on free loopback
    ports, its state in ``tmp`` and its output in ``tmp/corral.log``; not yet ready."""
    inference, management = free_port(), free_port()
    log_path = tmp / "corral.log"
    env = {
        **os.environ,
        "CORRAL_MANAGEMENT_TOKEN": token,
        "CORRAL_STATE_DIR": str(tmp),
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "corral.cli", "serve",
                "--model", str(model),
                "--llama-server", str(llama_server),
                "--inference-addr", f"127.0.0.1:{inference}",
                "--management-addr", f"127.0.0.1:{management}",
                *serve_args, "--", *llama_args,
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    return ServeProcess(
        process, f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}", log_path
    )


READY_TIMEOUT_S = 60.0
TOKEN = "real-test-token"


class Corral(ServeProcess):
    def fleet(self) -> dict[str, object]:
        request = urllib.request.Request(
            self.management + "/api/v1/fleet", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            data: dict[str, object] = json.loads(response.read())
            return data


def healthy(base: str) -> bool:
    """Whether ``base``'s ``/health`` answers 200 now."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def corral(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Corral]:
    started = start_serve(
        tmp_path_factory.mktemp("serve"),
        llama_server_bin,
        tiny_model,
        TOKEN,
        llama_args=["--parallel", "4", "--ctx-size", "4096"],
    )
    server = Corral(started.process, started.base, started.management, started.log_path)
    try:
        wait_until(
            lambda: healthy(server.base),
            "corral serve to become ready",
            READY_TIMEOUT_S,
            watch=[(server.process, server.log_path)],
        )
        yield server
    finally:
        server.stop()
