"""The autoscaling signal: how many instances each model wants, from slots and buffer.

One formula, used by ``GET /api/v1/autoscaling``, the
``corral_autoscaling_wanted_instances`` gauge and the StatsD push::

    demand   = slots_busy + buffered
    per      = slots_total / instances reporting slots   (mean slots per instance)
    wanted   = ceil(demand / (per * target_utilization))
    wanted   = max(wanted, 1) when anything is buffered
    wanted   = 1 if demand else 0                        when no instance reports slots

``target_utilization`` (0.8 unless asked otherwise) is the share of slots an
autoscaler should aim to keep busy: below 1 so that a burst finds free slots while new
instances start. Busy slots count every client's work an agent reports, not only this
balancer's. ``wanted`` may be 0 (no demand): the autoscaler's own minimum decides
whether a model scales to zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from corral.scheduling.scheduler import ANY_MODEL, Scheduler

#: The share of slots to keep busy when nobody asks for another target.
TARGET_UTILIZATION = 0.8

#: How the buffer of requests that name no model (scale from zero) is listed.
ANY_MODEL_NAME = "(any)"


@dataclass(frozen=True)
class ModelDemand:
    """One model's autoscaling inputs and the instance count they call for."""

    model: str
    wanted_instances: int
    instances: int
    """Instances of the model the balancer knows, in any state."""
    instances_ready: int
    """Of those, the ones taking requests now."""
    slots_total: int
    slots_busy: int
    buffered: int
    target_utilization: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def wanted_instances(
    slots_busy: int,
    buffered: int,
    slots_per_instance: float,
    target_utilization: float = TARGET_UTILIZATION,
) -> int:
    """The formula of the module doc."""
    demand = slots_busy + buffered
    if slots_per_instance <= 0:
        return 1 if demand > 0 else 0
    wanted = math.ceil(demand / (slots_per_instance * target_utilization) - 1e-9)
    return max(wanted, 1) if buffered > 0 else wanted


def model_demand(
    scheduler: Scheduler, model: str, target_utilization: float = TARGET_UTILIZATION
) -> ModelDemand:
    """``model``'s demand now (zeros for a model nothing is known about)."""
    now = scheduler.clock()
    key = ANY_MODEL if model == ANY_MODEL_NAME else model
    pool = [] if key == ANY_MODEL else scheduler.fleet.pool(key)
    reporting = [i for i in pool if i.total_slots > 0]
    slots_total = sum(i.total_slots for i in reporting)
    slots_busy = sum(i.busy_slots for i in reporting)
    buffered = scheduler.buffered(key)
    per_instance = slots_total / len(reporting) if reporting else 0.0
    return ModelDemand(
        model=model,
        wanted_instances=wanted_instances(slots_busy, buffered, per_instance, target_utilization),
        instances=len(pool),
        instances_ready=sum(1 for i in pool if i.usable(now)),
        slots_total=slots_total,
        slots_busy=slots_busy,
        buffered=buffered,
        target_utilization=target_utilization,
    )


def fleet_demand(
    scheduler: Scheduler, target_utilization: float = TARGET_UTILIZATION
) -> list[ModelDemand]:
    """Every model served, loadable or waited for, by name; requests naming no model
    while none is served are listed as ``(any)`` while any wait."""
    models = set(scheduler.known_models())
    models.update(m for m in scheduler.buffers if m != ANY_MODEL and scheduler.buffered(m))
    if scheduler.buffered(ANY_MODEL):
        models.add(ANY_MODEL_NAME)
    return [model_demand(scheduler, m, target_utilization) for m in sorted(models)]
