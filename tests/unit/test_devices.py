"""What a llama-server binary says of its devices, read and carried to the balancer."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from corral.protocol import DeviceReport, SupervisorReport
from corral.supervisor import devices
from corral.supervisor.devices import list_devices, parse_devices
from corral.supervisor.managed import ManagedInstance, ManagedOptions

VULKAN = """\
load_backend: loaded Vulkan backend from /x/libggml-vulkan.so
Available devices:
  Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (7938 MiB, 7900 MiB free)
"""
TWO_GPUS = """\
Available devices:
  CUDA0: NVIDIA L4 (22478 MiB, 22150 MiB free)
  CUDA1: NVIDIA L4 (22478 MiB, 1024 MiB free)
"""


def test_the_listing_is_read_line_by_line() -> None:
    assert parse_devices("Available devices:\n  (none)\n") == ()
    (vulkan,) = parse_devices(VULKAN)
    assert vulkan == DeviceReport("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", 7938, 7900)
    assert [(d.name, d.free_mib) for d in parse_devices(TWO_GPUS)] == [
        ("CUDA0", 22150),
        ("CUDA1", 1024),
    ]
    # a line before the listing that looks like one is not a device
    assert parse_devices("  X: y (1 MiB, 1 MiB free)\n") == ()


def test_devices_travel_in_the_supervisor_report() -> None:
    report = SupervisorReport(state="ready", devices=parse_devices(TWO_GPUS))
    again = SupervisorReport.from_wire(report.to_wire())
    assert again.devices == report.devices
    older = report.to_wire()
    del older["devices"]  # an agent from before devices were reported
    assert SupervisorReport.from_wire(older).devices == ()


async def test_the_binary_is_asked_once_and_a_broken_one_says_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "_cache", {})
    calls = tmp_path / "calls"
    binary = tmp_path / "llama-server"
    binary.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        f"sys.stdout.write({TWO_GPUS!r})\n"
    )
    binary.chmod(0o755)
    found = await list_devices(binary)
    assert [d.name for d in found] == ["CUDA0", "CUDA1"]
    assert await list_devices(binary) == found
    assert calls.read_text() == "x"  # read once per binary
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert await list_devices(broken) == ()
    hanging = tmp_path / "hanging"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    hanging.chmod(0o755)
    assert await list_devices(hanging, timeout=0.2) == ()
    assert await list_devices(tmp_path / "missing") == ()


async def test_a_stop_while_the_devices_are_listed_starts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unload that lands while a load is still asking the binary for its devices must
    not leave a server starting behind it (it would take the port the next load gets)."""
    monkeypatch.setattr(devices, "_cache", {})
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path))
    started = tmp_path / "started"
    binary = tmp_path / "llama-server"
    binary.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "if '--list-devices' in sys.argv:\n"
        "    time.sleep(0.5)\n"
        "    print('Available devices:')\n"
        "    sys.exit(0)\n"
        f"open({str(started)!r}, 'w').write('x')\n"
        "time.sleep(30)\n"
    )
    binary.chmod(0o755)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    made = ManagedInstance(
        ManagedOptions(
            binary=binary, model=model, port=18093, balancers=["127.0.0.1:1"],
            cluster_token="t", drain_timeout=0,
        )
    )  # fmt: skip
    starting = asyncio.create_task(made.start())
    await asyncio.sleep(0.1)  # it is listing devices now
    await made.stop()
    await starting
    assert made.supervisor.child is None
    await asyncio.sleep(0.3)
    assert not started.exists()
