"""Waiting on a state instead of sleeping for a time."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import pytest

WAIT_S = 20.0
"""How long a test waits for a state before it fails (generous: CI has 2 slow cores)."""


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], what: str, limit_s: float = WAIT_S
) -> None:
    """Poll ``condition`` (plain or async) every 20 ms until it holds; fail after
    ``limit_s`` naming ``what``."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)


Watched = tuple[subprocess.Popen[bytes], Path]
"""A process a wait watches, and its log file."""


def wait_until(
    condition: Callable[[], bool],
    what: str,
    limit_s: float = WAIT_S,
    *,
    watch: Iterable[Watched] = (),
    interval: float = 0.05,
) -> None:
    """The blocking twin of :func:`wait_for`, for tests that drive processes: poll
    ``condition`` until it holds. Fails at once when a watched process exits, and after
    ``limit_s``, naming ``what`` and showing the end of each watched log."""
    watched = list(watch)
    deadline = time.monotonic() + limit_s
    while not condition():
        for process, log in watched:
            if process.poll() is not None:
                pytest.fail(
                    f"{log.name} exited with {process.returncode} while waiting for {what}:\n"
                    + _tail(log)
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {log.name}\n{_tail(log)}" for _, log in watched)
            pytest.fail(f"timed out after {limit_s:g}s waiting for {what}\n{logs}")
        time.sleep(interval)


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(log unreadable: {exc})"
