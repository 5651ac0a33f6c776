"""Workloads: one module each, found by name.

A workload module defines ``NAME`` (the command-line word), ``TITLE``, ``ORDER`` (its
place in ``python -m bench all``) and ``async def run(ctx: BenchContext) -> Section``.
Drop a new module in this folder and it is picked up; nothing else to register.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.context import BenchContext


@dataclass
class Section:
    """What a workload contributes to docs/benchmarks.md."""

    title: str
    markdown: str
    images: list[Path] = field(default_factory=list)
    #: system name -> why it is missing from this section's numbers
    missing: dict[str, str] = field(default_factory=dict)
    #: the workload's NAME (set by the runner)
    name: str = ""


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    order: int
    run: Callable[[BenchContext], Awaitable[Section]]


def discover() -> dict[str, Workload]:
    """Every workload module in this package, in run order."""
    found: list[Workload] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if not all(hasattr(module, a) for a in ("NAME", "TITLE", "ORDER", "run")):
            continue
        found.append(Workload(module.NAME, module.TITLE, module.ORDER, module.run))
    return {w.name: w for w in sorted(found, key=lambda w: (w.order, w.name))}
