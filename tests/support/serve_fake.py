"""``corral serve`` as a process, with the fake llama-server standing in as its binary
(the integration tier's serve: real processes, the fake as llama-server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.support.waiting import wait_for

TOKEN = "serve-token"


@dataclass
class Serve:
    process: asyncio.subprocess.Process
    log_path: Path
    base: str
    management: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def llama_servers(self) -> list[psutil.Process]:
        """The live llama-server children (one that exits while they are listed, such
        as a killed one being reaped as its restart begins, is not one)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "llama-server" in " ".join(child.cmdline()):
                    found.append(child)
        return found


def fake_binary(tmp_path: Path, *flags: str) -> Path:
    """An executable that runs the fake llama-server with the arguments corral passes."""
    path = tmp_path / "llama-server"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from corral.testing.fake_llama_server import main\n"
        f"sys.exit(main([*sys.argv[1:], *{list(flags)!r}]))\n"
    )
    path.chmod(0o755)
    return path


async def start_serve(tmp_path: Path, *extra: str, fake_flags: tuple[str, ...] = ()) -> Serve:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")  # the fake never reads it
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": TOKEN, "CORRAL_STATE_DIR": str(tmp_path)}
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral.cli", "serve",
            "--model", str(model),
            "--llama-server", str(fake_binary(tmp_path, *fake_flags)),
            "--inference-addr", "127.0.0.1:0", "--management-addr", "127.0.0.1:0",
            *extra,
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    pattern = re.compile(r"at http://(\S+)/v1\s+\(management http://([^\s,]+),")

    def started() -> bool:
        return pattern.search(log_path.read_text(errors="replace")) is not None or (
            process.returncode is not None
        )

    await wait_for(started, "corral serve to start")
    match = pattern.search(log_path.read_text(errors="replace"))
    assert match, log_path.read_text()
    return Serve(process, log_path, f"http://{match[1]}", f"http://{match[2]}")


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        for child in serve.llama_servers() if serve.process.returncode is None else []:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if serve.process.returncode is None:
            serve.process.kill()
        await serve.process.wait()


async def healthy(http: aiohttp.ClientSession, serve: Serve) -> bool:
    async with http.get(serve.base + "/health") as response:
        return response.status == 200


async def ready_serve(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    cleanup: list[Serve],
    *extra: str,
    fake_flags: tuple[str, ...] = (),
) -> Serve:
    """Start ``corral serve`` (cleaned up after the test) and wait until it is healthy."""
    serve = await start_serve(tmp_path, *extra, fake_flags=fake_flags)
    cleanup.append(serve)
    await wait_for(lambda: healthy(http, serve), "serve to be healthy")
    return serve
