"""``least_busy`` (the default): most free slots first, then fewest requests in flight.

Ties go to the instance that has served fewest requests, so idle instances take
turns instead of the first one in the list taking everything.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.fleet.state import Instance
from corral.scheduling.policies.base import Placement, Policy


class LeastBusy(Policy):
    name = "least_busy"

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        if not candidates:
            return None
        return min(candidates, key=lambda i: (-i.free_slots, i.in_flight, i.served, i.id))
