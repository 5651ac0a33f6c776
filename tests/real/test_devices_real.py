"""The real llama-server's own device list: the CPU build lists none besides the CPU,
in the format :mod:`corral.supervisor.devices` reads (a changed format would read as
no devices, so the raw listing is checked too)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from corral.supervisor import devices
from corral.supervisor.devices import list_devices

pytestmark = pytest.mark.real


async def test_the_cpu_build_lists_no_device_besides_the_cpu(
    llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = await asyncio.to_thread(
        subprocess.run,
        [str(llama_server_bin), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert raw.returncode == 0, raw.stderr
    assert "Available devices:" in raw.stdout and "(none)" in raw.stdout
    monkeypatch.setattr(devices, "_cache", {})
    assert await list_devices(llama_server_bin) == ()
