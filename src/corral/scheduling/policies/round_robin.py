"""``round_robin``: take instances in turn, skipping those without a free slot.

For comparisons: it ignores how busy an instance is beyond "has a free slot".
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.fleet.state import Instance
from corral.scheduling.policies.base import Placement, Policy


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._next: dict[str, int] = {}

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda i: i.id)
        turn = self._next.get(request.model, 0)
        self._next[request.model] = turn + 1
        return ordered[turn % len(ordered)]
