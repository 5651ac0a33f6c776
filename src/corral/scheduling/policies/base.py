"""The placement policy interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.fleet.state import Instance


@dataclass
class Placement:
    """What a policy may look at: the model, and the request body when it is JSON."""

    model: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    pinnable: bool = False
    """The route runs on a slot and honours ``id_slot`` (chat and completions)."""
    slotless: bool = False
    """llama-server answers the route without a slot (see :meth:`Scheduler.peek`)."""


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        """Pick one of ``candidates`` (all usable, all with a free slot), or None."""
        ...
