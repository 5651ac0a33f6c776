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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- live GPU memory -----------------------------------------------------------------------

#: CUDA numbers devices fastest first unless told otherwise; NVML numbers them by PCI
#: bus. corral starts its servers with this order (unless the environment sets one) so
#: that ``CUDA1`` in llama-server is NVML's device 1.
CUDA_DEVICE_ORDER = "PCI_BUS_ID"

_nvml_state: dict[str, object] = {}


def _nvml() -> object | None:
    """The ``pynvml`` module (nvidia-ml-py), initialised once; None without the library
    or without an NVIDIA driver (``nvmlInit`` fails)."""
    if "module" in _nvml_state:
        return _nvml_state["module"]
    module: object | None = None
    try:
        import pynvml

        pynvml.nvmlInit()
        module = pynvml
        log.info("NVML: %d NVIDIA device(s)", pynvml.nvmlDeviceGetCount())
    except Exception as exc:  # ImportError, NVMLError (no driver, no library) ...
        log.debug("NVML unavailable: %s", exc)
    _nvml_state["module"] = module
    return module


def nvml_memory(env: Mapping[str, str] | None = None) -> dict[str, tuple[int, int]] | None:
    """``CUDA{i}`` -> (total, free) bytes, read from NVML now, numbered as llama-server
    numbers them under ``env`` (``CUDA_VISIBLE_DEVICES`` by index or UUID, PCI bus
    order); None when NVML cannot say or the numbering cannot be matched (a MIG
    instance, another ``CUDA_DEVICE_ORDER``)."""
    nvml: Any = _nvml()
    if nvml is None:
        return None
    env = os.environ if env is None else env
    if env.get("CUDA_DEVICE_ORDER", CUDA_DEVICE_ORDER) != CUDA_DEVICE_ORDER:
        return None
    try:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        handles = []
        if visible is None:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        else:
            for item in (v.strip() for v in visible.split(",")):
                if item.isdigit():
                    handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
                elif item.startswith("GPU-"):
                    handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
                elif item:
                    return None  # MIG-..., or something CUDA would stop the list at
                else:
                    break
        found = {}
        for index, handle in enumerate(handles):
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            found[f"CUDA{index}"] = (int(info.total), int(info.free))
        return found
    except Exception as exc:  # an NVMLError on one device: trust none of it
        log.warning("NVML memory read failed: %s", exc)
        return None


# -- out of memory -------------------------------------------------------------------------


@dataclass(frozen=True)
class OutOfMemory:
    """A server that could not allocate memory: where, how much it asked for, and the
    line that said so."""

    device: str | None
    """llama.cpp's device name (``CUDA0``, ``Vulkan1``, ``CPU``); None when not said."""
    requested: int | None
    """Bytes of the allocation that failed, when the log gives them."""
    line: str

    def describe(self) -> str:
        where = f" on {self.device}" if self.device else ""
        asked = f" (an allocation of {_mib(self.requested)} failed)" if self.requested else ""
        return f"out of memory{where}{asked}"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


#: llama.cpp's and ggml's lines when an allocation fails (CUDA, HIP, Vulkan, Metal, CPU).
_OOM_BUFFER = re.compile(r"failed to allocate (?P<dev>[A-Za-z_]+\d*) buffer of size (?P<size>\d+)")
_OOM_UNABLE = re.compile(r"unable to allocate (?P<dev>[A-Za-z_]+\d*) buffer")
_OOM_CUDA = re.compile(
    r"allocating (?P<mib>[\d.]+) MiB on device (?P<index>\d+): (?P<api>cuda|hip)Malloc failed"
)
_OOM_VULKAN = re.compile(r"Device memory allocation of size (?P<size>\d+) failed")
_OOM_WORDS = re.compile(
    r"out of memory|ErrorOutOfDeviceMemory|ErrorOutOfHostMemory|"
    r"failed to allocate (buffer|compute buffers)|llama_kv_cache: failed to allocate",
    re.IGNORECASE,
)


def out_of_memory(lines: Sequence[str]) -> OutOfMemory | None:
    """The first failed allocation a server's log lines report, or None."""
    found: OutOfMemory | None = None
    for line in lines:
        text = line.strip()
        match = _OOM_BUFFER.search(text)
        if match is not None:
            device = match["dev"]
            requested = int(match["size"])
            if found is not None and found.requested and found.device is None:
                requested = found.requested
            return OutOfMemory(device, requested or None, text)
        match = _OOM_UNABLE.search(text)
        if match is not None:
            return OutOfMemory(match["dev"], found.requested if found else None, text)
        if found is not None:
            continue
        match = _OOM_CUDA.search(text)
        if match is not None:
            prefix = "CUDA" if match["api"] == "cuda" else "ROCm"
            found = OutOfMemory(f"{prefix}{match['index']}", int(float(match["mib"]) * 2**20), text)
            continue
        match = _OOM_VULKAN.search(text)
        if match is not None:
            found = OutOfMemory(None, int(match["size"]), text)
            continue
        if _OOM_WORDS.search(text):
            found = OutOfMemory(None, None, text)
    return found
