"""The machine a run happened on: CPU, cores, memory, OS, Python."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    os: str
    kernel: str
    python: str
    aiohttp: str

    @classmethod
    def here(cls) -> Machine:
        return cls(
            cpu=cpu_model(),
            cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
            memory_gib=memory_gib(),
            os=os_name(),
            kernel=f"{platform.system()} {platform.release()} {platform.machine()}",
            python=platform.python_version(),
            aiohttp=_version("aiohttp"),
        )

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("CPU", self.cpu),
            ("cores", str(self.cores)),
            ("RAM", f"{self.memory_gib:.1f} GiB"),
            ("OS", self.os),
            ("kernel", self.kernel),
            ("Python (harness, load generator)", self.python),
            ("aiohttp (load generator)", self.aiohttp),
        ]
