"""The accelerators a llama-server binary can use, as it says itself.

``llama-server --list-devices`` prints one line per device besides the CPU::

    Available devices:
      Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits) (7938 MiB, 7938 MiB free)

(``  (none)`` for a CPU build). corral runs it once per binary when it starts a server
it supervises, without a shell and bounded in time, and reports what it read with the
server (:class:`corral.protocol.DeviceReport`), for ``corral status``, the dashboard
and the fleet's views. A binary that cannot say (an old one, a command template's
server) reports no devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from corral.protocol import DeviceReport

log = logging.getLogger(__name__)

#: ``  NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)``; the description may hold
#: parentheses of its own, so the memory is matched at the end.
_LINE = re.compile(
    r"^\s+(?P<name>[^\s:][^:]*):\s(?P<desc>.*)\s\((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$"
)

#: Seconds ``--list-devices`` may take (a GPU driver's first initialisation is slow).
LIST_TIMEOUT = 30.0

_cache: dict[tuple[str, int], tuple[DeviceReport, ...]] = {}


def parse_devices(text: str) -> tuple[DeviceReport, ...]:
    """The devices of ``--list-devices`` output (nothing for ``(none)``)."""
    found = []
    listing = False
    for line in text.splitlines():
        if line.startswith("Available devices"):
            listing = True
            continue
        match = _LINE.match(line) if listing else None
        if match is not None:
            found.append(
                DeviceReport(
                    name=match["name"].strip(),
                    description=match["desc"].strip(),
                    total_mib=int(match["total"]),
                    free_mib=int(match["free"]),
                )
            )
    return tuple(found)


async def list_devices(
    binary: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = LIST_TIMEOUT,  # noqa: ASYNC109 (bounds a child process, not a wait)
) -> tuple[DeviceReport, ...]:
    """What ``binary --list-devices`` reports, read once per binary file (its path and
    modification time); nothing when it fails or takes longer than ``timeout``."""
    try:
        key = (str(binary), os.stat(binary).st_mtime_ns)
    except OSError:
        return ()
    if key in _cache:
        return _cache[key]
    try:
        process = await asyncio.create_subprocess_exec(
            str(binary),
            "--list-devices",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env) if env is not None else None,
        )
    except OSError as exc:
        log.warning("cannot list devices binary=%s error=%s", binary, exc)
        return ()
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        log.warning("listing devices timed out binary=%s after=%.0fs", binary, timeout)
        return ()
    devices = parse_devices(output.decode(errors="replace"))
    _cache[key] = devices
    log.info(
        "devices binary=%s %s",
        binary,
        ", ".join(f"{d.name}={d.description}" for d in devices) or "none besides the CPU",
    )
    return devices
