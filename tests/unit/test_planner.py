"""The model host's planner: eviction by group, LRU and memory, the swap hold and idle
TTLs, as pure functions of made-up states on a made-up clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.hosting import ModelState
from corral.supervisor.planner import (
    Evict,
    Limits,
    Load,
    Refuse,
    Resident,
    Scale,
    Start,
    Wait,
    idle_expired,
    next_expiry,
    plan_replicas,
    plan_room,
)

LOADED, LOADING, UNLOADING = ModelState.LOADED, ModelState.LOADING, ModelState.UNLOADING
GiB = 1 << 30


def loaded(key: str, **fields: object) -> Resident:
    return Resident(key=key, state=LOADED, **fields)  # type: ignore[arg-type]


# -- max_instances and LRU ----------------------------------------------------------------


def test_a_load_that_fits_starts_at_once() -> None:
    plan = plan_room(Load("b"), [loaded("a")], Limits(max_instances=2), now=0.0)
    assert plan == Start()


def test_at_the_limit_the_least_recently_used_instance_goes() -> None:
    residents = [
        loaded("a", last_used=30.0),
        loaded("b", last_used=10.0),
        loaded("c", last_used=20.0),
    ]
    plan = plan_room(Load("d"), residents, Limits(max_instances=3), now=40.0)
    assert plan == Evict(("b",))


def test_idle_instances_go_before_busy_ones_however_recently_used() -> None:
    residents = [
        loaded("busy-old", last_used=1.0, in_flight=1),
        loaded("waited-for", last_used=2.0, waiting=3),
        loaded("idle-new", last_used=50.0),
    ]
    plan = plan_room(Load("x"), residents, Limits(max_instances=2), now=60.0)
    assert plan == Evict(("idle-new", "busy-old"))


def test_a_load_of_a_running_key_does_not_count_itself() -> None:
    plan = plan_room(Load("a"), [loaded("a"), loaded("b")], Limits(max_instances=2), now=0.0)
    assert plan == Start()


def test_instances_still_loading_are_never_evicted_the_load_waits_for_them() -> None:
    residents = [Resident("a", LOADING), Resident("b", LOADING)]
    plan = plan_room(Load("c"), residents, Limits(max_instances=2), now=0.0)
    assert plan == Wait()


def test_an_instance_still_unloading_counts_until_it_is_gone() -> None:
    residents = [Resident("a", UNLOADING), loaded("b", last_used=5.0)]
    # a still takes its place: to fit c, b (the one that may go) goes
    assert plan_room(Load("c"), residents, Limits(max_instances=2), now=9.0) == Evict(("b",))
    # with nothing else to evict, the load waits for a to be gone
    residents = [Resident("a", UNLOADING)]
    assert plan_room(Load("c"), residents, Limits(max_instances=1), now=9.0) == Wait()


# -- groups ---------------------------------------------------------------------------------


def test_an_exclusive_group_swaps_its_running_members_out_first() -> None:
    residents = [
        loaded("chat-a", group="chat", last_used=99.0),
        loaded("embed", last_used=1.0),
    ]
    load = Load("chat-b", group="chat", exclusive=True)
    # room for all three, yet the group member goes (it swaps), the LRU one stays
    assert plan_room(load, residents, Limits(max_instances=4), now=100.0) == Evict(("chat-a",))


def test_a_non_exclusive_group_keeps_its_members() -> None:
    residents = [loaded("chat-a", group="chat")]
    load = Load("chat-b", group="chat", exclusive=False)
    assert plan_room(load, residents, Limits(max_instances=4), now=0.0) == Start()


def test_a_group_member_still_loading_is_swapped_out_only_once_it_serves() -> None:
    residents = [Resident("chat-a", LOADING, group="chat")]
    load = Load("chat-b", group="chat", exclusive=True)
    assert plan_room(load, residents, Limits(max_instances=4), now=0.0) == Wait()


def test_a_persistent_group_is_never_evicted_for_another_group() -> None:
    residents = [
        loaded("keep-1", group="keep", persistent=True, last_used=1.0),
        loaded("keep-2", group="keep", persistent=True, last_used=2.0),
        loaded("other", last_used=50.0),
    ]
    # the persistent members are older, yet the other instance goes
    assert plan_room(Load("new"), residents, Limits(max_instances=3), now=60.0) == Evict(("other",))
    # with only persistent members left, the load is refused with what to change
    plan = plan_room(Load("new"), residents[:2], Limits(max_instances=2), now=60.0)
    assert isinstance(plan, Refuse)
    assert "none may be evicted (persistent groups)" in plan.reason
    assert "raise max_instances" in plan.reason


def test_a_load_in_a_persistent_group_may_evict_its_own_members() -> None:
    residents = [loaded("keep-1", group="keep", persistent=True)]
    load = Load("keep-2", group="keep")
    assert plan_room(load, residents, Limits(max_instances=1), now=0.0) == Evict(("keep-1",))


# -- memory -------------------------------------------------------------------------------


def test_memory_evicts_lru_instances_until_the_load_fits() -> None:
    residents = [
        loaded("a", estimate=2 * GiB, last_used=1.0),
        loaded("b", estimate=2 * GiB, last_used=2.0),
        loaded("c", estimate=2 * GiB, last_used=3.0),
    ]
    load = Load("big", estimate=5 * GiB)
    plan = plan_room(load, residents, Limits(max_instances=8), now=9.0, available=1 * GiB)
    assert plan == Evict(("a", "b"))  # 1 + 2 + 2 = 5 GiB: a third is not needed


def test_memory_that_can_never_suffice_refuses_with_both_numbers() -> None:
    residents = [loaded("a", estimate=1 * GiB)]
    load = Load("huge", estimate=10 * GiB)
    plan = plan_room(load, residents, Limits(max_instances=8), now=0.0, available=2 * GiB)
    assert isinstance(plan, Refuse)
    assert "needs about 10.0 GiB" in plan.reason
    assert "3.0 GiB is available even after evicting" in plan.reason


def test_servers_still_starting_count_their_memory_as_taken() -> None:
    residents = [Resident("starting", LOADING, estimate=3 * GiB)]
    load = Load("next", estimate=2 * GiB)
    # 4 GiB free by the system's count, but the starting one will take 3: wait for it
    plan = plan_room(load, residents, Limits(max_instances=8), now=0.0, available=4 * GiB)
    assert plan == Wait()


def test_memory_is_not_checked_when_turned_off_or_unknown() -> None:
    residents = [loaded("a", estimate=8 * GiB)]
    load = Load("b", estimate=8 * GiB)
    off = Limits(max_instances=8, memory_check=False)
    assert plan_room(load, residents, off, now=0.0, available=0) == Start()
    assert plan_room(load, residents, Limits(max_instances=8), now=0.0, available=None) == Start()


# -- the swap hold ------------------------------------------------------------------------


def test_a_busy_victim_keeps_serving_until_the_swap_hold_is_over() -> None:
    residents = [loaded("a", in_flight=2)]
    load = Load("b", began=100.0)
    limits = Limits(max_instances=1, swap_hold=5.0)
    assert plan_room(load, residents, limits, now=100.0) == Wait(until=105.0)
    assert plan_room(load, residents, limits, now=104.9) == Wait(until=105.0)
    assert plan_room(load, residents, limits, now=105.0) == Evict(("a",))


def test_an_idle_victim_goes_at_once_whatever_the_hold() -> None:
    residents = [loaded("a")]
    limits = Limits(max_instances=1, swap_hold=30.0)
    assert plan_room(Load("b", began=0.0), residents, limits, now=0.0) == Evict(("a",))


def test_a_victim_with_requests_waiting_for_it_counts_as_busy_for_the_hold() -> None:
    residents = [loaded("a", waiting=1)]
    limits = Limits(max_instances=1, swap_hold=2.0)
    assert plan_room(Load("b", began=10.0), residents, limits, now=11.0) == Wait(until=12.0)


# -- idle TTLs ------------------------------------------------------------------------------


def test_an_idle_instance_expires_after_its_ttl_and_not_before() -> None:
    residents = [loaded("a", ttl=60.0, last_used=100.0), loaded("forever", last_used=0.0)]
    assert idle_expired(residents, now=159.9) == []
    assert idle_expired(residents, now=160.0) == ["a"]
    assert next_expiry(residents, now=120.0) == 160.0


def test_busy_queued_or_unsettled_instances_do_not_expire() -> None:
    residents = [
        loaded("flying", ttl=1.0, in_flight=1),
        loaded("waited-for", ttl=1.0, waiting=2),
        loaded("queued", ttl=1.0, queued=True),
        Resident("starting", LOADING, ttl=1.0),
        Resident("going", UNLOADING, ttl=1.0),
    ]
    assert idle_expired(residents, now=1000.0) == []
    # a busy one is looked at again one TTL from now (its last use moves on when idle)
    assert next_expiry(residents, now=1000.0) == 1001.0


def test_no_ttl_means_no_expiry_to_wait_for() -> None:
    assert next_expiry([loaded("a"), Resident("b", LOADING, ttl=5.0)], now=0.0) is None


# -- properties over any state ------------------------------------------------------------

_states = st.sampled_from([LOADED, LOADED, LOADING, UNLOADING])
_residents = st.lists(
    st.builds(
        Resident,
        key=st.sampled_from("abcdefgh"),
        state=_states,
        estimate=st.integers(0, 8).map(lambda n: n * GiB),
        last_used=st.floats(0, 100),
        in_flight=st.integers(0, 2),
        waiting=st.integers(0, 1),
        group=st.sampled_from([None, "g", "p"]),
        persistent=st.booleans(),
    ),
    max_size=7,
    unique_by=lambda r: r.key,
)


@given(
    residents=_residents,
    group=st.sampled_from([None, "g", "p"]),
    exclusive=st.booleans(),
    estimate=st.integers(0, 8).map(lambda n: n * GiB),
    available=st.integers(0, 16).map(lambda n: n * GiB),
    max_instances=st.integers(1, 5),
    now=st.floats(0, 200),
)
def test_a_plan_evicts_only_what_it_may_and_leaves_room(
    residents: list[Resident],
    group: str | None,
    exclusive: bool,
    estimate: int,
    available: int,
    max_instances: int,
    now: float,
) -> None:
    load = Load("z", estimate=estimate, began=0.0, group=group, exclusive=exclusive)
    limits = Limits(max_instances=max_instances, swap_hold=50.0)
    plan = plan_room(load, residents, limits, now=now, available=available)
    by_key = {r.key: r for r in residents}
    if isinstance(plan, Evict):
        victims = [by_key[k] for k in plan.keys]
        assert len(set(plan.keys)) == len(plan.keys)
        for victim in victims:
            swapped = exclusive and group is not None and victim.group == group
            assert swapped or victim.state is LOADED  # never one loading or unloading
            assert swapped or not (victim.persistent and victim.group != group)
        assert len(residents) - len(victims) + 1 <= max_instances
        if now < 50.0:
            assert not any(v.busy for v in victims)  # held while the hold lasts
    if isinstance(plan, Start):
        assert len(residents) + 1 <= max_instances
        assert not (exclusive and group is not None and any(r.group == group for r in residents))


# -- replicas ---------------------------------------------------------------------------------


def replica(key: str, state: ModelState = LOADED, **fields: object) -> Resident:
    return Resident(key=key, state=state, **fields)  # type: ignore[arg-type]


def scale(replicas: list[Resident], **given: object) -> Scale:
    values: dict[str, object] = {
        "minimum": 0, "maximum": 2, "waited": None, "free_slots": 0, "now": 100.0,
        "wait_s": 2.0, "idle_s": 30.0, **given,
    }  # fmt: skip
    return plan_replicas(replicas, **values)  # type: ignore[arg-type]


def test_another_replica_starts_when_requests_have_waited_with_every_slot_busy() -> None:
    busy = [replica("m", in_flight=1, last_used=99.0)]
    assert scale(busy, waited=2.5) == Scale(add=True)
    assert scale(busy, waited=1.0) == Scale()  # not long enough yet
    assert scale(busy, waited=5.0, free_slots=1) == Scale()  # a slot is free: no need
    assert scale(busy, waited=5.0, maximum=1) == Scale()  # at its most
    starting = [*busy, replica("m#r2", LOADING)]
    assert scale(starting, waited=9.0, maximum=3) == Scale()  # one at a time
    assert scale([], minimum=2) == Scale(add=True)  # min is kept running
    assert scale([replica("m", last_used=0.0)], minimum=2) == Scale(add=True)


def test_idle_replicas_stop_newest_first_down_to_min() -> None:
    idle = [replica("m", last_used=10.0), replica("m#r2", last_used=20.0)]
    assert scale(idle, minimum=1) == Scale(remove=("m#r2",))
    assert scale(idle, minimum=0) == Scale(remove=("m#r2", "m"))  # scale to zero
    assert scale(idle, minimum=2) == Scale()
    recent = [replica("m", last_used=10.0), replica("m#r2", last_used=90.0)]
    assert scale(recent, minimum=0) == Scale(remove=("m",))  # r2 was used 10 s ago
    working = [replica("m", last_used=10.0), replica("m#r2", in_flight=1, last_used=10.0)]
    assert scale(working, minimum=1) == Scale(remove=("m",))  # the busy one stays
    too_many = [replica("m", last_used=0.0), replica("m#r2"), replica("m#r3", last_used=0.0)]
    assert scale(too_many, minimum=0, maximum=2, now=10.0, idle_s=5.0) == Scale(
        remove=("m#r3", "m#r2", "m")
    )
