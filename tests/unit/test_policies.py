"""Placement policies: which instance with a free slot a request goes to."""

from __future__ import annotations

from collections import Counter

import pytest

from corral.fleet.state import Instance, InstanceState
from corral.protocol import InstanceReport
from corral.scheduling.policies import (
    POLICIES,
    LeastBusy,
    Placement,
    Policy,
    RandomPolicy,
    RoundRobin,
    make_policy,
)
from corral.scheduling.scheduler import Scheduler

PLACEMENT = Placement(model="m")


def instance(
    name: str, total: int = 4, in_flight: int = 0, foreign: int = 0, served: int = 0
) -> Instance:
    inst = Instance(id=name, agent_id="a", url=f"http://{name}", model="m")
    inst.state = InstanceState.READY
    inst.total_slots = total
    inst.in_flight = in_flight
    inst.foreign_busy = foreign
    inst.served = served
    return inst


def scheduler_with_slots(policy: Policy, slots: dict[str, tuple[int, int]]) -> Scheduler:
    """A scheduler whose one agent reports instances ``name -> (total_slots, busy)``."""
    scheduler = Scheduler(policy)
    scheduler.register_agent("a", "agent-a")
    snapshot = [
        {"id": name, "url": f"http://{name}", "model": "m", "total_slots": total, "busy": busy}
        for name, (total, busy) in slots.items()
    ]
    assert scheduler.apply_snapshot("a", 1, [InstanceReport.from_wire(d) for d in snapshot])
    return scheduler


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_none_when_no_candidate_has_a_free_slot(name: str) -> None:
    assert make_policy(name).choose([], PLACEMENT) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_places_only_on_instances_with_a_free_slot(name: str) -> None:
    scheduler = scheduler_with_slots(make_policy(name), {"full": (2, 2), "b": (2, 0), "c": (1, 0)})
    chosen: set[str] = set()
    for _ in range(60):
        lease = scheduler.try_lease("m", PLACEMENT)
        assert lease is not None
        assert lease.instance.id != "a/full"
        chosen.add(lease.instance.id)
        scheduler.release(lease)
    assert chosen <= {"a/b", "a/c"}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_stops_placing_once_every_slot_is_claimed(name: str) -> None:
    scheduler = scheduler_with_slots(make_policy(name), {"b": (2, 0), "c": (1, 1), "d": (3, 1)})
    leases = [scheduler.try_lease("m", PLACEMENT) for _ in range(4)]
    assert all(lease is not None for lease in leases)
    assert scheduler.try_lease("m", PLACEMENT) is None
    for inst in scheduler.fleet.instances.values():
        assert inst.free_slots == 0
        assert inst.in_flight + inst.foreign_busy == inst.total_slots


def test_least_busy_is_the_default_policy_and_make_policy_rejects_unknown_names() -> None:
    from corral.config import load_settings

    assert load_settings(environ={}).policy == "least_busy"
    assert isinstance(make_policy("least_busy"), LeastBusy)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


def test_least_busy_prefers_the_instance_with_most_free_slots() -> None:
    a = instance("a", total=4, in_flight=3)
    b = instance("b", total=4, in_flight=1)
    c = instance("c", total=8, in_flight=2, foreign=4)
    assert LeastBusy().choose([a, b, c], PLACEMENT) is b


def test_least_busy_breaks_free_slot_ties_by_fewest_in_flight() -> None:
    mine = instance("a", total=4, in_flight=2)  # 2 free, 2 of ours in flight
    foreign = instance("b", total=3, foreign=1)  # 2 free, none of ours in flight
    assert LeastBusy().choose([mine, foreign], PLACEMENT) is foreign


def test_least_busy_idle_instances_take_turns() -> None:
    scheduler = scheduler_with_slots(LeastBusy(), {"x": (2, 0), "y": (2, 0), "z": (2, 0)})
    picks = []
    for _ in range(9):
        lease = scheduler.try_lease("m", PLACEMENT)
        assert lease is not None
        picks.append(lease.instance.id)
        scheduler.release(lease)
    assert Counter(picks) == {"a/x": 3, "a/y": 3, "a/z": 3}
    assert len(set(picks[:3])) == 3  # each idle instance once before any repeats


def test_round_robin_cycles_through_instances_in_turn() -> None:
    policy = RoundRobin()
    candidates = [instance("c"), instance("a"), instance("b")]
    picks = [policy.choose(candidates, PLACEMENT) for _ in range(7)]
    assert [p.id for p in picks if p] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_a_separate_turn_for_each_model() -> None:
    policy = RoundRobin()
    candidates = [instance("a"), instance("b")]
    first = policy.choose(candidates, Placement(model="m"))
    other = policy.choose(candidates, Placement(model="other"))
    assert first is not None and other is not None
    assert first.id == other.id == "a"


def test_round_robin_skips_instances_without_a_free_slot() -> None:
    scheduler = scheduler_with_slots(RoundRobin(), {"a": (1, 0), "b": (1, 1), "c": (1, 0)})
    picks = []
    for _ in range(6):
        lease = scheduler.try_lease("m", PLACEMENT)
        assert lease is not None
        picks.append(lease.instance.id)
        scheduler.release(lease)
    assert set(picks) == {"a/a", "a/c"}
    assert picks[:2] in (["a/a", "a/c"], ["a/c", "a/a"])


def test_random_with_a_seed_returns_only_candidates_and_covers_all_of_them() -> None:
    candidates = [instance(name) for name in "abcde"]
    policy = RandomPolicy(seed=7)
    picks: Counter[str] = Counter()
    for _ in range(500):
        chosen = policy.choose(candidates, PLACEMENT)
        assert chosen is not None
        assert any(chosen is c for c in candidates)
        picks[chosen.id] += 1
    assert set(picks) == set("abcde")


def test_random_with_the_same_seed_repeats_its_choices() -> None:
    candidates = [instance(name) for name in "abcd"]
    first, second = RandomPolicy(seed=3), RandomPolicy(seed=3)
    run_a = [first.choose(candidates, PLACEMENT) for _ in range(50)]
    run_b = [second.choose(candidates, PLACEMENT) for _ in range(50)]
    assert [i.id for i in run_a if i] == [i.id for i in run_b if i]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_policy_s_flags_say_which_hooks_it_writes(name: str) -> None:
    """``learns`` and ``advises_waits`` spare the gateway and scheduler per-request work
    for policies without those hooks: a policy that writes a hook must say so."""
    policy = make_policy(name)
    assert policy.learns is (type(policy).record_cached is not Policy.record_cached)
    assert policy.advises_waits is (type(policy).wait_advice is not Policy.wait_advice)
