"""The placement policy interface: one base class, every hook explicit.

The scheduler asks a policy to :meth:`Policy.choose` an instance among usable ones
with a free slot, and calls the other hooks at their moments; each defaults to "no
opinion", so a policy writes only what it decides (as SGLang's router policy trait
has default no-op hooks):

- :meth:`Policy.choose_slot`: the slot a request is pinned to (``id_slot``), or None;
- :meth:`Policy.wait_advice`: hold a request for a busy instance instead of placing it;
- :meth:`Policy.record_cached`: learn from what a response reported (cached tokens),
  which its lease carries into the scheduler's release (:class:`Served`);
- :meth:`Policy.forget_instance`: an instance restarted or left;
- :attr:`Policy.decisions`: how many placements each reason took (a metric).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(slots=True)
class Served:
    """What a response reported of its prompt: the gateway sets it on the request's
    lease, and the scheduler's release hands it to :meth:`Policy.record_cached` before
    the slot is free again (so the next placement knows what is cached)."""

    placement: Placement
    cached_tokens: int
    prompt_tokens: int
    prompt_seconds: float | None = None
    total_seconds: float | None = None


@dataclass(frozen=True)
class WaitAdvice:
    """Waiting for ``instance_id`` (no free slot now) is cheaper than going elsewhere.

    ``expected_wait_s``: until one of its slots frees, on average. ``saved_prefill_s``:
    prefill time the request would spend elsewhere on blocks only this instance holds.
    ``max_wait_s``: how long waiting stays worth it (then place it anywhere).
    """

    instance_id: str
    expected_wait_s: float
    saved_prefill_s: float
    max_wait_s: float


class Policy:
    """A placement policy; subclasses set :attr:`name` and write :meth:`choose`."""

    name: str = ""
    advises_waits: bool = False
    """The policy writes :meth:`wait_advice`: the scheduler then gathers the usable pool
    for it on every placement (a pass over the fleet it skips otherwise)."""
    learns: bool = False
    """The policy writes :meth:`record_cached`: the gateway then hands each response's
    prompt usage to the lease (:class:`Served`); for one that does not, nothing is
    built per request."""

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()
        """How many placements each reason took; empty for a policy with no reasons."""
        self.last_reason: str | None = None
        """Why the last :meth:`choose` chose what it chose (one of :attr:`decisions`'
        reasons); None for a policy with no reasons. A lease carries it (traces)."""

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        """Pick one of ``candidates`` (all usable, all with a free slot), or None."""
        raise NotImplementedError

    def choose_slot(self, instance: Instance, request: Placement) -> int | None:
        """The slot of ``instance`` to pin ``request`` to; None: llama-server picks."""
        return None

    def wait_advice(self, pool: Sequence[Instance], request: Placement) -> WaitAdvice | None:
        """Advice to hold ``request`` for one busy instance of ``pool``; None: place it."""
        return None

    def record_cached(
        self,
        instance_id: str,
        model: str,
        body: Mapping[str, Any] | None,
        cached_tokens: int,
        prompt_tokens: int,
        *,
        prompt_seconds: float | None = None,
        total_seconds: float | None = None,
    ) -> None:
        """Learn from what a response placed on ``instance_id`` reported."""

    def forget_instance(self, instance_id: str) -> None:
        """``instance_id`` restarted or left: forget what is known about it."""
