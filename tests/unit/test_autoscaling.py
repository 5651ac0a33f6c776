"""The autoscaling signal and the scrape-time metrics built on the scheduler.

The scheduler does no I/O, so these drive it directly with agent snapshots and buffered
``acquire`` calls; the metrics are read from the balancer's own registry.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corral.fleet.state import Instance
from corral.observe.autoscaling import ANY_MODEL_NAME, fleet_demand, model_demand, wanted_instances
from corral.observe.metrics import BalancerMetrics
from corral.observe.statsd import statsd_lines
from corral.protocol import InstanceReport, SupervisorReport
from corral.scheduling.policies import LeastBusy, Placement, PrefixPolicy
from corral.scheduling.scheduler import Scheduler

_seq = itertools.count(1)


def report(scheduler: Scheduler, *instances: dict[str, Any], agent: str = "a") -> None:
    scheduler.register_agent(agent, agent)
    assert scheduler.apply_snapshot(
        agent, next(_seq), [InstanceReport.from_wire(d) for d in instances]
    )


def inst(id: str, model: str = "m", slots: int = 4, busy: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "id": id,
        "url": f"http://127.0.0.1/{id}",
        "model": model,
        "total_slots": slots,
        "busy": busy,
        "state": "ready",
        **extra,
    }


def gauge(metrics: BalancerMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def buffer(scheduler: Scheduler, model: str, count: int) -> list[asyncio.Task[Any]]:
    """``count`` requests waiting in ``model``'s buffer."""
    tasks = [
        asyncio.create_task(scheduler.acquire(model, Placement(model=model))) for _ in range(count)
    ]
    async with asyncio.timeout(2):
        while scheduler.buffered(model) < count:  # noqa: ASYNC110
            await asyncio.sleep(0)
    return tasks


@pytest.mark.parametrize(
    ("busy", "buffered", "per_instance", "target", "wanted"),
    [
        (0, 0, 4, 0.8, 0),  # no demand: nothing wanted (the autoscaler's minimum decides)
        (3, 0, 4, 0.8, 1),  # 3 busy of 3.2 wanted busy per instance
        (4, 0, 4, 0.8, 2),  # one more than 80 % of one instance
        (8, 4, 4, 0.8, 4),  # 12 / 3.2 = 3.75
        (8, 0, 4, 1.0, 2),  # full use of two
        (0, 1, 32, 0.8, 1),  # anything buffered wants at least one
        (0, 3, 0, 0.8, 1),  # slots unknown (scale from zero): start one, learn its slots
        (2, 0, 0, 0.8, 1),
    ],
)
def test_wanted_instances_follows_the_documented_formula(
    busy: int, buffered: int, per_instance: float, target: float, wanted: int
) -> None:
    assert wanted_instances(busy, buffered, per_instance, target) == wanted


async def test_demand_counts_busy_slots_and_buffered_requests_per_model() -> None:
    scheduler = Scheduler(LeastBusy(), buffer_timeout=5)
    report(scheduler, inst("1", busy=4), inst("2", busy=4), inst("3", model="idle", slots=2))
    waiting = await buffer(scheduler, "m", 2)
    try:
        demand = {d.model: d for d in fleet_demand(scheduler)}
        m = demand["m"]
        assert (m.instances, m.instances_ready, m.slots_total, m.slots_busy, m.buffered) == (
            2,
            2,
            8,
            8,
            2,
        )
        assert m.wanted_instances == 4  # ceil(10 / (4 * 0.8))
        assert demand["idle"].wanted_instances == 0
        assert model_demand(scheduler, "m", 1.0).wanted_instances == 3  # ceil(10 / 4)
        assert model_demand(scheduler, "never-heard-of").as_dict()["wanted_instances"] == 0

        metrics = BalancerMetrics(scheduler)
        assert gauge(metrics, "corral_autoscaling_wanted_instances") == {
            (("model", "idle"),): 0.0,
            (("model", "m"),): 4.0,
        }
        lines = statsd_lines(scheduler, "lb")
        assert "lb.wanted_instances:4|g" in lines
        assert "lb.model.m.wanted_instances:4|g" in lines
        assert "lb.model.idle.wanted_instances:0|g" in lines
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


async def test_requests_waiting_for_any_model_want_one_instance() -> None:
    scheduler = Scheduler(LeastBusy(), buffer_timeout=5)
    waiting = await buffer(scheduler, "", 2)  # nothing served yet: scale from zero
    try:
        (demand,) = fleet_demand(scheduler)
        assert demand.model == ANY_MODEL_NAME
        assert (demand.buffered, demand.wanted_instances) == (2, 1)
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


def test_placement_decisions_are_exported_by_reason() -> None:
    policy = PrefixPolicy()
    scheduler = Scheduler(policy)
    report(scheduler, inst("1"), inst("2"))
    metrics = BalancerMetrics(scheduler)
    body = {"messages": [{"role": "user", "content": "a long shared system prompt " * 40}]}
    for _ in range(3):
        lease = scheduler.try_lease("m", Placement(model="m", body=body))
        assert lease is not None
        scheduler.release(lease)
    lease = scheduler.try_lease("m", Placement(model="m"))
    assert lease is not None
    exported = gauge(metrics, "corral_placement_decisions_total")
    assert exported == {(("reason", r),): float(n) for r, n in policy.decisions.items()}
    assert sum(exported.values()) == 4
    assert exported[(("reason", "no_prompt"),)] == 1


def test_supervisor_counts_are_counted_once_as_they_grow() -> None:
    scheduler = Scheduler(LeastBusy())
    metrics = BalancerMetrics(scheduler)
    instance = Instance(id="a/0", agent_id="a", url="http://x", model="m")

    def reported(**counts: Any) -> None:
        instance.supervisor = SupervisorReport.from_wire({"state": "ready", **counts})
        metrics.observe_supervisors([instance])

    reported(launches=1, restarts=0, failed_runs=0, readies=1, startup_seconds=[0.5])
    reported(launches=1, restarts=0, failed_runs=0, readies=1, startup_seconds=[0.5])  # again
    # two crashes and restarts between two reports (states coalesced): both count
    reported(launches=3, restarts=2, failed_runs=2, readies=3, startup_seconds=[0.5, 0.7, 0.9])
    assert metrics.instance_starts.labels("m")._value.get() == 3
    assert metrics.instance_restarts.labels("m")._value.get() == 2
    assert metrics.instance_failures.labels("m")._value.get() == 2
    startup = gauge(metrics, "corral_instance_startup_seconds_sum")
    assert startup[(("model", "m"),)] == pytest.approx(0.5 + 0.7 + 0.9)
    # a new supervisor behind the same instance id starts from zero again
    reported(launches=1, restarts=0, failed_runs=0, readies=1, startup_seconds=[0.2])
    assert metrics.instance_starts.labels("m")._value.get() == 4
