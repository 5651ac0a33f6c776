"""The systems under test, in the order a run measures them.

Each is started by the harness on loopback in front of its own llama-server (same
binary, same model, same arguments), measured, and stopped before the next one
starts, so no two compete for the machine's cores.
"""

from __future__ import annotations

from bench.systems.base import Endpoint, System
from bench.systems.corral import Corral, CorralBaseline, CorralTraced
from bench.systems.direct import Direct
from bench.systems.litellm import LiteLLM
from bench.systems.nginx import Nginx
from bench.systems.passthrough import Passthrough
from bench.systems.router import Router

__all__ = ["ALL_SYSTEMS", "Endpoint", "System", "make_systems"]

ALL_SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (Direct, Corral, CorralTraced, CorralBaseline, Router, LiteLLM, Nginx, Passthrough)
}


def make_systems(names: tuple[str, ...]) -> list[System]:
    return [ALL_SYSTEMS[name]() for name in names]
