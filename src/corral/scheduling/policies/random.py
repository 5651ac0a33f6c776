"""``random``: a uniformly random instance with a free slot (a baseline for comparisons)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from corral.fleet.state import Instance
from corral.scheduling.policies.base import Placement, Policy


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._random = random.Random(seed)

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        if not candidates:
            return None
        return self._random.choice(list(candidates))
