"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.processes import Processes


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Processes]:
    """Start corral's parts as processes; every one is killed at the end."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection per request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s
