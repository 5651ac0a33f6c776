"""The balancer's scheduler: slot leases, buffering, routing by model, fleet, breaker.

The scheduler does no I/O, so these tests drive it directly: agent snapshots through
``register_agent`` + ``apply_snapshot``, leases through ``acquire``/``try_lease``/
``release``, time through a fake clock. Waiting is on conditions with a timeout, never
on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.fleet.state import RELEASE_MEMORY, Instance
from corral.protocol import InstanceReport
from corral.scheduling.policies import LeastBusy, Placement, RoundRobin
from corral.scheduling.scheduler import (
    ANY_MODEL,
    BufferFull,
    BufferTimeout,
    Lease,
    ModelRequired,
    NoCapacity,
    Scheduler,
    UnknownModel,
)

P = Placement(model="m")
_seq = itertools.count(1)  # report sequence numbers, always increasing


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def inst(
    id: str = "i1",
    model: str = "m",
    slots: int = 1,
    busy: int = 0,
    state: str = "ready",
    **extra: Any,
) -> dict[str, Any]:
    """One instance as an agent reports it."""
    return {
        "id": id,
        "url": f"http://127.0.0.1/{id}",
        "model": model,
        "total_slots": slots,
        "busy": busy,
        "state": state,
        **extra,
    }


def report(scheduler: Scheduler, *instances: dict[str, Any], agent: str = "a") -> bool:
    """Register ``agent`` (if new) and apply a fresh snapshot of its instances."""
    scheduler.register_agent(agent, f"agent-{agent}")
    return scheduler.apply_snapshot(
        agent, next(_seq), [InstanceReport.from_wire(d) for d in instances]
    )


def instance(scheduler: Scheduler, id: str = "i1", agent: str = "a") -> Instance:
    return scheduler.fleet.instances[f"{agent}/{id}"]


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Yield turns of the loop until ``condition`` holds; fail after ``within`` seconds.

    Scheduler state changes synchronously inside other tasks' turns, so yielding turns
    (not sleeping for a time) is the wait.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


def lease_now(scheduler: Scheduler, model: str = "m") -> Lease:
    lease = scheduler.try_lease(model, Placement(model=model))
    assert lease is not None
    return lease


# -- slot leases and reconciliation with agent reports ---------------------------------


def test_dispatch_claims_a_slot_and_release_frees_it_at_once_without_a_report() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    i = instance(s)
    lease = lease_now(s)
    assert (i.in_flight, i.free_slots) == (1, 0)
    assert s.try_lease("m", P) is None
    s.release(lease)
    assert (i.in_flight, i.free_slots) == (0, 1)
    assert s.try_lease("m", P) is not None


def test_report_counting_our_own_in_flight_requests_does_not_double_count() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=4))
    i = instance(s)
    leases = [lease_now(s) for _ in range(2)]
    report(s, inst(slots=4, busy=2))  # the agent sees our two requests as busy
    assert (i.foreign_busy, i.busy_slots, i.free_slots) == (0, 2, 2)
    s.release(leases[0])  # freed at once, before the next report
    assert (i.in_flight, i.free_slots) == (1, 3)


def test_report_taken_before_our_dispatch_does_not_free_our_claimed_slot() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    lease_now(s)
    report(s, inst(slots=1, busy=0))  # read before the request reached the server
    assert instance(s).free_slots == 0
    assert s.try_lease("m", P) is None


def test_foreign_busy_slots_from_other_clients_are_respected() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=4, busy=3))  # three slots busy with other balancers' work
    i = instance(s)
    assert i.foreign_busy == 3
    lease = lease_now(s)
    assert s.try_lease("m", P) is None
    report(s, inst(slots=4, busy=4))  # ours plus the three foreign ones
    assert (i.foreign_busy, i.free_slots) == (3, 0)
    s.release(lease)
    assert i.free_slots == 1
    clock.advance(RELEASE_MEMORY + 0.1)
    report(s, inst(slots=4, busy=1))  # the other clients finished, but one
    assert (i.foreign_busy, i.free_slots) == (1, 3)


def test_a_report_read_before_our_release_does_not_leave_a_phantom_busy_slot() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=2))
    i = instance(s)
    lease = lease_now(s)
    clock.advance(0.2)
    s.release(lease)
    clock.advance(0.1)
    report(s, inst(slots=2, busy=1))  # /slots was read while our request still ran
    assert (i.foreign_busy, i.free_slots) == (0, 2)
    clock.advance(RELEASE_MEMORY + 0.1)
    report(s, inst(slots=2, busy=1))  # still busy long after: another client's work
    assert (i.foreign_busy, i.free_slots) == (1, 1)


def test_releasing_a_lease_twice_frees_only_one_slot() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=2))
    first, second = lease_now(s), lease_now(s)
    s.release(first)
    s.release(first, outcome="client_gone")
    assert instance(s).in_flight == 1
    s.release(second)
    assert instance(s).in_flight == 0


async def test_client_gone_release_hands_the_slot_to_the_oldest_buffered_request() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    held = lease_now(s)
    waiter = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 1)
    s.release(held, outcome="client_gone")
    lease = await asyncio.wait_for(waiter, 2)
    assert lease.instance is held.instance and instance(s).in_flight == 1
    assert lease.waited >= 0


async def test_256_concurrent_acquires_on_one_slot_never_hold_more_than_one_lease() -> None:
    s = Scheduler(LeastBusy(), max_buffered=256, buffer_timeout=30)
    report(s, inst(slots=1))
    i = instance(s)
    peak = 0
    claim = s.try_lease

    def watched(*args: Any, **kwargs: Any) -> Lease | None:
        nonlocal peak
        lease = claim(*args, **kwargs)
        peak = max(peak, i.in_flight)  # in_flight only grows here
        return lease

    s.try_lease = watched  # type: ignore[method-assign]
    served: list[int] = []

    async def client(n: int) -> None:
        lease = await s.acquire("m", P)
        assert i.in_flight == 1
        served.append(n)
        await asyncio.sleep(0)  # hold the slot across a turn of the loop
        assert i.in_flight == 1
        s.release(lease)

    async with asyncio.timeout(10):
        await asyncio.gather(*(client(n) for n in range(256)))
    assert peak == 1
    assert served == list(range(256))  # FIFO: served in arrival order
    assert i.in_flight == 0 and s.buffered() == 0


# -- the buffer ---------------------------------------------------------------------------


async def test_buffered_requests_are_served_fifo_per_model() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", model="m", slots=1), inst("y", model="n", slots=1))
    held_m, held_n = lease_now(s, "m"), lease_now(s, "n")
    order: list[str] = []

    async def client(model: str, tag: str) -> None:
        lease = await s.acquire(model, Placement(model=model))
        order.append(tag)
        s.release(lease)

    tasks = [
        asyncio.create_task(client(model, f"{model}{k}")) for k in range(3) for model in ("m", "n")
    ]
    await until(lambda: s.buffered("m") == 3 and s.buffered("n") == 3)
    s.release(held_n)  # a slot for "n" serves only "n" waiters, oldest first
    await until(lambda: len(order) == 3)
    assert order == ["n0", "n1", "n2"]
    assert s.buffered("m") == 3
    s.release(held_m)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[3:] == ["m0", "m1", "m2"]


async def test_buffer_overflow_raises_buffer_full_429_with_retry_after() -> None:
    s = Scheduler(LeastBusy(), max_buffered=2, buffer_timeout=8)
    report(s, inst(slots=1))
    lease_now(s)
    waiters = [asyncio.create_task(s.acquire("m", P)) for _ in range(2)]
    await until(lambda: s.buffered("m") == 2)
    with pytest.raises(BufferFull) as caught:
        await s.acquire("m", P)
    assert caught.value.status == 429
    assert caught.value.error_type == "rate_limit_error"
    assert int(caught.value.headers["Retry-After"]) >= 1
    assert s.buffered("m") == 2  # the refused request took no place
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_buffered_request_times_out_with_504_after_buffer_timeout() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=0.05)
    report(s, inst(slots=1))
    lease_now(s)
    with pytest.raises(BufferTimeout) as caught:
        await s.acquire("m", P)
    assert caught.value.status == 504
    assert s.buffered("m") == 0
    assert instance(s).in_flight == 1  # only the lease still held


async def test_acquire_timeout_argument_overrides_the_buffer_timeout() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    report(s, inst(slots=1))
    lease_now(s)
    with pytest.raises(BufferTimeout):
        await s.acquire("m", P, timeout=0.02)


async def test_lease_granted_as_the_buffer_timeout_fires_is_not_leaked() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    held = lease_now(s)
    task = asyncio.create_task(s.acquire("m", P, timeout=0))
    await asyncio.sleep(0)  # the task enters the buffer; its timeout is due next turn
    assert s.buffered("m") == 1
    s.release(held)  # grants the slot before the timeout callback runs
    try:
        lease: Lease | None = await task
    except BufferTimeout:
        lease = None
    if lease is not None:
        s.release(lease)
    assert instance(s).in_flight == 0
    assert s.try_lease("m", P) is not None


async def test_max_buffered_zero_raises_no_capacity_503_at_once() -> None:
    s = Scheduler(LeastBusy(), max_buffered=0, buffer_timeout=60)
    report(s, inst(slots=1))
    assert (await s.acquire("m", P)).instance is instance(s)
    with pytest.raises(NoCapacity) as caught:
        await s.acquire("m", P)
    assert caught.value.status == 503
    assert "Retry-After" in caught.value.headers
    assert s.buffered() == 0


async def test_shutting_down_scheduler_refuses_new_requests_with_503() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    s.accepting = False
    with pytest.raises(NoCapacity):
        await s.acquire("m", P)
    assert instance(s).in_flight == 0


async def test_cancelled_waiter_leaves_the_buffer_at_once_and_its_place_is_reused() -> None:
    s = Scheduler(LeastBusy(), max_buffered=1, buffer_timeout=60)
    report(s, inst(slots=1))
    held = lease_now(s)
    gone = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 1)
    with pytest.raises(BufferFull):
        await s.acquire("m", P)
    gone.cancel()  # the client went away
    assert s.buffered("m") == 0
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(s.buffers["m"]) == 0
    after = asyncio.create_task(s.acquire("m", P))  # takes the freed place
    await until(lambda: s.buffered("m") == 1)
    s.release(held)
    lease = await asyncio.wait_for(after, 2)
    assert lease.instance.in_flight == 1


async def test_waiter_cancelled_right_after_it_was_granted_a_lease_gives_the_slot_back() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    report(s, inst(slots=1))
    held = lease_now(s)
    gone = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 1)
    nxt = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 2)
    s.release(held)  # grants the slot to `gone` ...
    assert instance(s).in_flight == 1
    gone.cancel()  # ... whose client leaves before it runs again
    with pytest.raises(asyncio.CancelledError):
        await gone
    lease = await asyncio.wait_for(nxt, 2)  # the slot went on to the next waiter
    assert instance(s).in_flight == 1
    s.release(lease)
    assert instance(s).in_flight == 0


async def test_new_request_behind_a_waiter_excluding_the_free_instance_is_served() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    report(s, inst("x", slots=1), inst("y", slots=1))
    held_x, held_y = lease_now(s), lease_now(s)
    assert {held_x.instance.id, held_y.instance.id} == {"a/x", "a/y"}
    if held_x.instance.id != "a/x":
        held_x, held_y = held_y, held_x
    retry = asyncio.create_task(s.acquire("m", P, exclude=frozenset({"a/x"})))
    await until(lambda: s.buffered("m") == 1)
    s.release(held_x)  # x is free, but the retry wants anything but x
    assert not retry.done()
    lease = await asyncio.wait_for(s.acquire("m", P), 2)
    assert lease.instance.id == "a/x"
    s.release(held_y)
    assert (await asyncio.wait_for(retry, 2)).instance.id == "a/y"


# -- scale from zero ------------------------------------------------------------------


async def test_request_arriving_with_no_instance_waits_and_is_served_when_one_is_ready() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    model = s.resolve_model("m")
    assert model == "m"
    waiter = asyncio.create_task(s.acquire(model, P))
    await until(lambda: s.buffered("m") == 1)
    report(s, inst(slots=1, state="starting"))  # loading: not yet
    await asyncio.sleep(0)
    assert not waiter.done()
    report(s, inst(slots=1, state="ready"))
    lease = await asyncio.wait_for(waiter, 2)
    assert lease.instance.id == "a/i1" and lease.model == "m"


async def test_request_naming_no_model_with_none_served_is_served_by_the_first_ready() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    model = s.resolve_model(None)
    assert model == ANY_MODEL
    waiter = asyncio.create_task(s.acquire(model, Placement(model=model)))
    await until(lambda: s.buffered() == 1)
    report(s, inst(model="qwen", slots=1))
    lease = await asyncio.wait_for(waiter, 2)
    assert lease.model == "qwen"


# -- routing by model -------------------------------------------------------------------


def test_unknown_model_raises_404_listing_served_models() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", model="llama"), inst("y", model="qwen"))
    with pytest.raises(UnknownModel) as caught:
        s.resolve_model("mistral")
    assert caught.value.status == 404
    assert "llama" in caught.value.message and "qwen" in caught.value.message


def test_request_naming_no_model_with_exactly_one_served_goes_to_it() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", model="llama"), inst("y", model="llama"))
    assert s.resolve_model(None) == "llama"
    assert s.resolve_model("") == "llama"


def test_request_naming_no_model_with_several_served_raises_model_required_400() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", model="llama"), inst("y", model="qwen"))
    with pytest.raises(ModelRequired) as caught:
        s.resolve_model(None)
    assert caught.value.status == 400
    assert "llama" in caught.value.message and "qwen" in caught.value.message


async def test_alias_resolves_to_its_model_and_leases_its_instance() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(model="llama-3b-q4", aliases=["llama", "llama-3b-q4"]))
    assert instance(s).aliases == ["llama"]
    assert s.resolve_model("llama") == "llama-3b-q4"
    lease = await s.acquire("llama", Placement(model="llama"))
    assert lease.instance.id == "a/i1" and lease.model == "llama-3b-q4"


def test_any_name_goes_to_the_one_model_served_as_llama_server_answers_it() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", model="llama"))
    assert s.resolve_model("gpt-3.5-turbo") == "llama"
    report(s, inst("x", model="llama"), inst("y", model="qwen"))
    with pytest.raises(UnknownModel):
        s.resolve_model("gpt-3.5-turbo")


def test_alias_patterns_match_names_and_an_exact_name_wins_over_any_pattern() -> None:
    s = Scheduler(LeastBusy())
    report(
        s,
        inst("x", model="llama", aliases=["gpt-*", "claude-?"]),
        inst("y", model="qwen", aliases=["gpt-4o"]),
    )
    assert s.resolve_model("gpt-3.5-turbo") == "llama"
    assert s.resolve_model("claude-3") == "llama"
    assert s.resolve_model("gpt-4o") == "qwen"  # exact alias of another model
    with pytest.raises(UnknownModel) as caught:
        s.resolve_model("claude-35")  # ``?`` is one character
    assert "gpt-*" in caught.value.message  # the 404 lists patterns as names to ask by


def test_default_model_takes_unknown_and_missing_names_among_several() -> None:
    s = Scheduler(LeastBusy(), default_model="q")
    report(s, inst("x", model="llama"), inst("y", model="qwen", aliases=["q"]))
    assert s.resolve_model("gpt-4o-mini") == "qwen"
    assert s.resolve_model(None) == "qwen"
    assert s.resolve_model("llama") == "llama"


def test_model_served_before_but_gone_now_waits_instead_of_404() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(model="llama"))
    s.agent_gone("a")
    assert s.resolve_model("llama") == "llama"
    with pytest.raises(UnknownModel):
        s.resolve_model("qwen")


# -- fleet: agents, reports, readiness ------------------------------------------------


async def test_instance_leaves_the_pool_when_its_agent_disconnects() -> None:
    s = Scheduler(LeastBusy(), buffer_timeout=60)
    report(s, inst("x", slots=1), agent="a")
    report(s, inst("y", slots=1), agent="b")
    held = lease_now(s)
    lease_now(s)
    waiter = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 1)
    gone_agent = held.instance.agent_id
    s.agent_gone(gone_agent)
    assert held.instance.id not in s.fleet.instances
    assert gone_agent not in s.fleet.agents
    s.release(held)  # its slot does not come back: the instance left the pool
    await asyncio.sleep(0)
    assert not waiter.done()
    assert s.try_lease("m", P) is None
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


def test_instance_leaves_the_pool_when_its_agent_misses_reports_for_report_timeout() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    assert s.report_timeout == 3.0  # the documented default
    report(s, inst(slots=2))
    clock.advance(3.0)
    s.check_stale()
    assert not instance(s).stale
    assert s.try_lease("m", P) is not None
    clock.advance(0.1)
    s.check_stale()
    assert instance(s).stale
    assert s.try_lease("m", P) is None


async def test_stale_instance_rejoins_the_pool_on_its_next_report_and_serves_waiters() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock, buffer_timeout=60)
    report(s, inst(slots=1))
    clock.advance(5)
    s.check_stale()
    waiter = asyncio.create_task(s.acquire("m", P))
    await until(lambda: s.buffered("m") == 1)
    report(s, inst(slots=1))
    lease = await asyncio.wait_for(waiter, 2)
    assert not lease.instance.stale


def test_snapshot_with_a_sequence_number_not_newer_is_dropped() -> None:
    s = Scheduler(LeastBusy())
    s.register_agent("a", "agent-a")
    assert s.apply_snapshot("a", 5, [InstanceReport.from_wire(inst(slots=4, busy=1))])
    assert not s.apply_snapshot("a", 5, [InstanceReport.from_wire(inst(slots=4, busy=4))])
    assert not s.apply_snapshot("a", 4, [])
    assert instance(s).foreign_busy == 1
    assert s.apply_snapshot("a", 6, [InstanceReport.from_wire(inst(slots=4, busy=2))])
    assert instance(s).foreign_busy == 2


def test_snapshot_from_an_unregistered_agent_is_dropped() -> None:
    s = Scheduler(LeastBusy())
    assert not s.apply_snapshot("nobody", 1, [InstanceReport.from_wire(inst())])
    assert s.fleet.instances == {}


def test_instance_missing_from_the_next_snapshot_leaves_the_pool() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x"), inst("y"))
    report(s, inst("y"))
    assert set(s.fleet.instances) == {"a/y"}
    assert s.fleet.agents["a"].instance_ids == {"a/y"}


def test_instance_with_issues_gets_no_traffic() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=4, issues=[{"kind": "unreachable", "message": "refused"}]))
    assert instance(s).issues[0].kind == "unreachable"
    assert s.try_lease("m", P) is None
    report(s, inst(slots=4))
    assert s.try_lease("m", P) is not None


@pytest.mark.parametrize("state", ["starting", "draining", "stopped", "failed"])
def test_instance_not_in_state_ready_gets_no_traffic(state: str) -> None:
    s = Scheduler(LeastBusy())
    report(s, inst("x", slots=4, state=state), inst("y", slots=1))
    lease = lease_now(s)
    assert lease.instance.id == "a/y"
    assert s.try_lease("m", P) is None


def test_broken_event_listener_does_not_break_scheduling() -> None:
    s = Scheduler(LeastBusy())
    events: list[dict[str, Any]] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    s.listeners += [broken, events.append]
    report(s, inst(slots=1))
    s.release(lease_now(s), outcome="upstream_failed")
    assert {e["type"] for e in events} >= {"agent", "fleet", "breaker"}


# -- circuit breaker --------------------------------------------------------------------


def test_upstream_failure_sets_the_instance_aside_and_traffic_goes_elsewhere() -> None:
    clock = FakeClock()
    s = Scheduler(RoundRobin(), clock=clock)
    report(s, inst("x", slots=4), inst("y", slots=4))
    s.release(lease_now(s), outcome="upstream_failed")  # round robin starts at x
    assert instance(s, "x").breaker.failures == 1
    picks = {lease_now(s).instance.id for _ in range(4)}
    assert picks == {"a/y"}


def test_after_cooldown_one_probe_goes_and_its_success_closes_the_breaker() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=4))
    i = instance(s)
    s.release(lease_now(s), outcome="upstream_failed")
    assert s.try_lease("m", P) is None
    clock.advance(i.breaker.base_cooldown)
    probe = lease_now(s)
    assert s.try_lease("m", P) is None  # free slots, but only one probe at a time
    s.release(probe, outcome="ok")
    assert i.breaker.failures == 0
    assert [lease_now(s) for _ in range(4)]


def test_failed_probe_sets_the_instance_aside_for_twice_as_long() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=2))
    cooldown = instance(s).breaker.base_cooldown
    s.release(lease_now(s), outcome="upstream_failed")
    clock.advance(cooldown)
    s.release(lease_now(s), outcome="upstream_failed")
    clock.advance(cooldown)
    assert s.try_lease("m", P) is None
    clock.advance(cooldown)
    assert s.try_lease("m", P) is not None


def test_probe_whose_client_went_away_lets_another_probe_go() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=2))
    s.release(lease_now(s), outcome="upstream_failed")
    clock.advance(instance(s).breaker.base_cooldown)
    s.release(lease_now(s), outcome="client_gone")
    assert instance(s).breaker.failures == 1  # nothing learned either way
    assert s.try_lease("m", P) is not None


def test_only_one_probe_goes_while_an_older_request_is_abandoned() -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock)
    report(s, inst(slots=4))
    older = lease_now(s)  # dispatched before the instance failed
    s.release(lease_now(s), outcome="upstream_failed")
    clock.advance(instance(s).breaker.base_cooldown)
    lease_now(s)  # the probe
    s.release(older, outcome="client_gone")  # not the probe: must not allow another
    assert s.try_lease("m", P) is None


# -- property: slot accounting under random interleavings ------------------------------

SLOTS = {"x": 3, "y": 2}
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(["m", "mm"])),
        st.tuples(st.just("try_lease"), st.sampled_from(["m", "mm"])),
        st.tuples(
            st.just("release"),
            st.integers(0, 20),
            st.sampled_from(["ok", "ok", "client_gone", "upstream_failed"]),
        ),
        st.tuples(st.just("release_again"), st.integers(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(
            st.just("snapshot"),
            st.integers(0, SLOTS["x"]),
            st.integers(0, SLOTS["y"]),
            st.sampled_from(["ready", "ready", "starting", "draining"]),
            st.booleans(),
        ),
        st.tuples(st.just("stale_seq"), st.integers(0, SLOTS["x"])),
        st.tuples(st.just("tick"), st.floats(0, 5)),
        st.tuples(st.just("check_stale")),
        st.tuples(st.just("yield")),
    ),
    max_size=40,
)


async def _interleave(ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    s = Scheduler(LeastBusy(), clock=clock, max_buffered=4, buffer_timeout=60)
    granted: list[Lease] = []
    claim = s.try_lease

    def recorded(*args: Any, **kwargs: Any) -> Lease | None:
        lease = claim(*args, **kwargs)
        if lease is not None:
            granted.append(lease)
        return lease

    s.try_lease = recorded  # type: ignore[method-assign]

    def snapshot(busy_x: int, busy_y: int, state: str, with_y: bool) -> None:
        listed = [inst("x", slots=SLOTS["x"], busy=busy_x, state=state, aliases=["mm"])]
        if with_y:
            listed.append(inst("y", slots=SLOTS["y"], busy=busy_y))
        report(s, *listed)

    def check() -> None:
        instances = {id(lease.instance): lease.instance for lease in granted}
        instances.update({id(i): i for i in s.fleet.instances.values()})
        for i in instances.values():
            ours = sum(1 for lease in granted if lease.instance is i and not lease.released)
            assert i.in_flight == ours  # counted by our own leases, exactly
            assert 0 <= i.in_flight <= i.total_slots
            assert 0 <= i.free_slots and i.in_flight + i.foreign_busy <= i.total_slots

    snapshot(0, 0, "ready", True)
    held: list[Lease] = []
    pending: list[asyncio.Task[Lease]] = []

    def settle() -> None:
        for task in [t for t in pending if t.done()]:
            pending.remove(task)
            if not task.cancelled() and task.exception() is None:
                held.append(task.result())

    for op in ops:
        kind = op[0]
        if kind == "acquire":
            pending.append(asyncio.create_task(s.acquire(op[1], Placement(model=op[1]))))
        elif kind == "try_lease":
            lease = s.try_lease(op[1], Placement(model=op[1]))
            if lease is not None:
                held.append(lease)
        elif kind == "release" and held:
            s.release(held.pop(op[1] % len(held)), outcome=op[2])
        elif kind == "release_again" and granted:
            s.release(granted[op[1] % len(granted)])  # no-op unless still held
            held = [lease for lease in held if not lease.released]
        elif kind == "cancel" and pending:
            pending[op[1] % len(pending)].cancel()
        elif kind == "snapshot":
            snapshot(*op[1:])
        elif kind == "stale_seq":
            s.apply_snapshot(
                "a", 0, [InstanceReport.from_wire(inst("x", slots=SLOTS["x"], busy=op[1]))]
            )
        elif kind == "tick":
            clock.advance(op[1])
        elif kind == "check_stale":
            s.check_stale()
        elif kind == "yield":
            await asyncio.sleep(0)
        check()
        settle()

    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    settle()
    check()
    for lease in held:
        s.release(lease)
    check()
    assert all(lease.released for lease in granted)  # nothing leaked


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_random_interleavings_keep_in_flight_within_zero_and_total_slots(
    ops: list[tuple[Any, ...]],
) -> None:
    asyncio.run(_interleave(ops))


async def test_wait_until_wakes_on_a_change_of_the_fleet_not_on_a_timer() -> None:
    s = Scheduler(LeastBusy())
    waiting = asyncio.create_task(s.wait_until(lambda: bool(s.fleet.pool("m")), 5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    report(s, inst(model="m"))  # a snapshot is a change: the predicate is checked again
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert await s.wait_until(lambda: False, 0.05) is False


async def test_a_lease_used_as_a_context_manager_releases_itself_with_its_outcome() -> None:
    s = Scheduler(LeastBusy())
    report(s, inst(slots=1))
    with pytest.raises(RuntimeError):
        with await s.acquire("m", Placement(model="m")) as lease:
            assert instance(s).in_flight == 1
            raise RuntimeError("the handler failed")
    assert lease.released and instance(s).in_flight == 0  # released as client_gone
    with await s.acquire("m", Placement(model="m")) as lease:
        lease.outcome = "upstream_failed"
    assert instance(s).breaker.failures == 1  # the outcome it was given
