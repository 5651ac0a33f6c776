"""``corral serve`` started as its own process, as a user starts it, for real-tier tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
