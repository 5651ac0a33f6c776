"""What every workload gets: the binary, the model, where to write, how big to run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.procs import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"

#: llama-server arguments every system's llama-server gets, so all backends are equal.
DEFAULT_LLAMA_ARGS = ("--parallel", "4", "--ctx-size", "4096")


class StartupError(RuntimeError):
    """A system could not be started; the message goes into the report."""


@dataclass
class BenchContext:
    llama_server: Path
    model: Path
    run_dir: Path
    docs_dir: Path
    scale: float = 1.0
    systems: tuple[str, ...] = ()
    llama_args: tuple[str, ...] = DEFAULT_LLAMA_ARGS
    install_missing: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        """The name requests use: the file stem (corral's and the router's model id)."""
        return self.model.stem

    def count(self, base: int, minimum: int = 20) -> int:
        """A request count scaled by ``--scale``."""
        return max(minimum, round(base * self.scale))

    def log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    what: str,
    within: float,
    proc: ManagedProcess | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it is true; fail at once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + within
    while True:
        if proc is not None and not proc.alive():
            raise StartupError(
                f"{proc.name} exited before {what}; last lines of {proc.log_path}:\n{proc.tail()}"
            )
        try:
            if await check():
                return
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            tail = f"; last lines of {proc.log_path}:\n{proc.tail()}" if proc else ""
            raise StartupError(f"timed out after {within:g} s waiting for {what}{tail}")
        await asyncio.sleep(interval)


async def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        session.get(url, headers=headers) as response,
    ):
        await response.read()
        return response.status


async def http_json(url: str, headers: dict[str, str] | None = None) -> object:
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        session.get(url, headers=headers) as response,
    ):
        return await response.json(content_type=None)


async def wait_healthy(url: str, *, what: str, proc: ManagedProcess, within: float = 60.0) -> None:
    """Wait for ``GET url`` to answer 200."""

    async def ok() -> bool:
        return await http_status(url) == 200

    await wait_until(ok, what=what, within=within, proc=proc)
