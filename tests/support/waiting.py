"""Waiting on a state instead of sleeping for a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

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
