"""The ``prefix`` policy: prompt keys, cache affinity, the load guard, sessions, feedback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.cli import build_parser
from corral.config import load_settings
from corral.fleet.state import Instance, InstanceState
from corral.protocol import InstanceReport, SupervisorReport
from corral.scheduling.policies import POLICIES, Placement, make_policy
from corral.scheduling.policies.prefix import PrefixPolicy, PrefixSettings, prompt_text
from corral.scheduling.scheduler import Scheduler


def instance(name: str, total: int = 4, in_flight: int = 0, served: int = 0) -> Instance:
    inst = Instance(id=name, agent_id="a", url=f"http://{name}", model="m")
    inst.state = InstanceState.READY
    inst.total_slots = total
    inst.in_flight = in_flight
    inst.served = served
    return inst


def sentence(topic: str, turn: int, role: str = "user") -> str:
    """A message long enough to span a few 64-character blocks, unique per topic/turn."""
    return f"{role} {topic} turn {turn}: " + " ".join(f"{topic}-word-{turn}-{i}" for i in range(12))


def conversation(topic: str, turns: int) -> list[dict[str, Any]]:
    """The messages of turn ``turns`` of a chat: earlier turns with their answers."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": f"You help with {topic}."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": sentence(topic, turn)})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": sentence(topic, turn, "assistant")})
    return messages


def chat(topic: str, turns: int, headers: dict[str, str] | None = None) -> Placement:
    return Placement("m", {"model": "m", "messages": conversation(topic, turns)}, headers or {})


def place(policy: PrefixPolicy, candidates: list[Instance], request: Placement) -> Instance:
    chosen = policy.choose(candidates, request)
    assert chosen is not None
    return chosen


# -- the prompt key -------------------------------------------------------------------------


def test_an_earlier_turns_key_is_a_prefix_of_every_later_turns_key() -> None:
    keys = [prompt_text({"messages": conversation("tea", n)}) for n in (1, 2, 3)]
    assert all(keys)
    assert keys[1] is not None and keys[2] is not None
    assert keys[1].startswith(str(keys[0]))
    assert keys[2].startswith(keys[1])


def test_multi_part_text_content_keys_like_the_same_string_content() -> None:
    text = sentence("parts", 0)
    as_string = {"messages": [{"role": "user", "content": text}]}
    as_parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text[:20]},
                    {"type": "text", "text": text[20:]},
                ],
            }
        ]
    }
    assert prompt_text(as_parts) == prompt_text(as_string)


def test_images_key_by_digest_so_equal_images_match_and_different_ones_do_not() -> None:
    def with_image(url: str) -> dict[str, Any]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}

    big = "data:image/png;base64," + "A" * 100_000
    assert prompt_text(with_image(big)) == prompt_text(with_image(big))
    assert prompt_text(with_image(big)) != prompt_text(with_image(big + "B"))
    assert len(str(prompt_text(with_image(big)))) < 200


def test_roles_system_field_and_tools_are_part_of_the_key() -> None:
    user = {"messages": [{"role": "user", "content": "x"}]}
    assistant = {"messages": [{"role": "assistant", "content": "x"}]}
    assert prompt_text(user) != prompt_text(assistant)
    assert prompt_text({**user, "system": "be brief"}) != prompt_text(user)
    assert prompt_text({**user, "tools": [{"type": "function"}]}) != prompt_text(user)


def test_completion_prompts_key_as_strings_token_lists_or_lists_of_them() -> None:
    assert prompt_text({"prompt": "Once upon a time"}) == "Once upon a time"
    tokens = prompt_text({"prompt": [1, 2, 3]})
    assert tokens is not None and tokens.startswith("tokens:")
    assert prompt_text({"prompt": [1, 2, 3, 4]}) == str(tokens) + " 4"
    batch = prompt_text({"prompt": ["first prompt", "second"]})
    assert batch is not None and batch.startswith("first prompt")


@pytest.mark.parametrize(
    "body",
    [None, {}, {"input": "embed me"}, {"messages": []}, {"prompt": ""}, {"prompt": 42}],
)
def test_bodies_without_messages_or_prompt_have_no_key(body: dict[str, Any] | None) -> None:
    assert prompt_text(body) is None


# -- placement ------------------------------------------------------------------------------


def test_the_prefix_policy_is_registered_and_selectable() -> None:
    assert POLICIES["prefix"] is PrefixPolicy
    assert isinstance(make_policy("prefix"), PrefixPolicy)
    assert load_settings(environ={}, overrides={"policy": "prefix"}).policy == "prefix"
    assert build_parser().parse_args(["balancer", "--policy", "prefix"]).policy == "prefix"


def test_a_follow_up_turn_goes_to_the_instance_that_served_the_conversation() -> None:
    policy = PrefixPolicy()
    pool = [instance("a"), instance("b"), instance("c")]
    first = place(policy, pool, chat("tea", 1))
    first.served += 1
    for turns in (2, 3, 4):
        chosen = place(policy, pool, chat("tea", turns))
        assert chosen is first
        assert policy.last_decision is not None
        assert policy.last_decision.reason == "prefix"
        chosen.served += 1


def test_interleaved_conversations_each_stick_to_their_own_instance() -> None:
    policy = PrefixPolicy()
    pool = [instance("a"), instance("b"), instance("c")]
    topics = ["tea", "rust", "jazz", "boats", "chess", "ferns"]
    home: dict[str, str] = {}
    for turns in (1, 2, 3):
        for topic in topics if turns % 2 else reversed(topics):
            chosen = place(policy, pool, chat(topic, turns))
            chosen.served += 1
            assert home.setdefault(topic, chosen.id) == chosen.id
    assert set(home.values()) == {"a", "b", "c"}


def test_distinct_conversations_spread_across_idle_instances() -> None:
    policy = PrefixPolicy()
    pool = [instance("a"), instance("b"), instance("c")]
    picks = []
    for topic in ["tea", "rust", "jazz", "boats", "chess", "ferns"]:
        chosen = place(policy, pool, chat(topic, 1))
        chosen.served += 1
        picks.append(chosen.id)
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    assert policy.decisions["least_busy"] == 6


def test_the_load_guard_sends_affine_work_to_the_least_busy_instance() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b", served=5)
    assert place(policy, [a, b], chat("tea", 1)) is a
    a.in_flight = 3  # 3 of 4 slots busy, b idle: 0.75 - 0 > 0.5 and 0.75 > 1.5 x 0
    assert place(policy, [a, b], chat("tea", 2)) is b
    assert policy.last_decision is not None
    assert policy.last_decision.reason == "guard"


def test_a_moderate_imbalance_keeps_cache_affinity() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b", served=5)
    assert place(policy, [a, b], chat("tea", 1)) is a
    a.in_flight, b.in_flight = 3, 1  # 0.75 - 0.25 is not more than 0.5
    assert place(policy, [a, b], chat("tea", 2)) is a


def test_the_load_guard_margin_and_ratio_are_settings() -> None:
    policy = PrefixPolicy(PrefixSettings(guard_margin=0.2))
    a, b = instance("a"), instance("b", served=5)
    place(policy, [a, b], chat("tea", 1))
    a.in_flight, b.in_flight = 3, 1  # 0.5 > 0.2 and 0.75 > 1.5 x 0.25
    assert place(policy, [a, b], chat("tea", 2)) is b


def test_the_longest_match_wins_over_a_shorter_one() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    policy.tree.insert(policy.blocks("m", chat("tea", 1).body), "b")
    policy.tree.insert(policy.blocks("m", chat("tea", 3).body), "a")
    assert place(policy, [b, a], chat("tea", 4)) is a


def test_a_match_below_both_thresholds_is_not_followed() -> None:
    policy = PrefixPolicy(PrefixSettings(min_match_blocks=50, match_fraction=0.9))
    a, b = instance("a"), instance("b")
    place(policy, [a, b], chat("tea", 1))
    a.served = 1
    assert place(policy, [a, b], chat("tea", 3)) is b
    assert policy.last_decision is not None
    assert policy.last_decision.reason == "least_busy"


def test_when_the_cached_instance_is_full_the_request_goes_elsewhere() -> None:
    policy = PrefixPolicy()
    a, b = instance("a", total=1), instance("b", total=1)
    place(policy, [a, b], chat("tea", 1))
    assert place(policy, [b], chat("tea", 2)) is b  # a is busy: not a candidate
    assert policy.last_decision is not None
    assert policy.last_decision.reason == "cached_full"


def test_models_keep_separate_prefixes() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    body = {"messages": conversation("tea", 1)}
    assert place(policy, [a, b], Placement("m", body)) is a
    a.served = 1
    assert place(policy, [a, b], Placement("other", body)) is b


def test_a_session_header_keeps_a_session_on_its_instance() -> None:
    policy = PrefixPolicy()
    pool = [instance("a"), instance("b"), instance("c")]
    short = {"messages": [{"role": "user", "content": "hi"}]}  # no whole block: no prefix
    first = place(policy, pool, Placement("m", short, {"X-Session-Id": "s1"}))
    for n in range(5):
        first.served += 1
        again = place(policy, pool, Placement("m", short, {"x-session-id": "s1"}))
        assert again is first, n
        assert policy.last_decision is not None
        assert policy.last_decision.reason == "session"
    other = place(policy, pool, Placement("m", short, {"X-Session-Id": "s2"}))
    assert other is not first


def test_session_affinity_yields_to_the_load_guard() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b", served=1)
    short = {"messages": [{"role": "user", "content": "hi"}]}
    assert place(policy, [a, b], Placement("m", short, {"X-Session-Id": "s"})) is a
    a.in_flight = 3
    assert place(policy, [a, b], Placement("m", short, {"X-Session-Id": "s"})) is b
    a.in_flight = 0
    assert place(policy, [a, b], Placement("m", short, {"X-Session-Id": "s"})) is b


@pytest.mark.parametrize("body", [None, {"input": "embed me"}, {"prompt": ""}])
def test_bodies_without_a_prompt_go_to_the_least_busy_and_record_nothing(
    body: dict[str, Any] | None,
) -> None:
    policy = PrefixPolicy()
    a, b = instance("a", in_flight=2), instance("b", in_flight=1)
    assert place(policy, [a, b], Placement("m", body)) is b
    assert policy.last_decision is not None
    assert policy.last_decision.reason == "no_prompt"
    assert len(policy.tree) == 0


def test_completion_prompts_stick_like_chats() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    story = "Once upon a time " * 40
    assert place(policy, [a, b], Placement("m", {"prompt": story})) is a
    a.served = 3
    assert place(policy, [a, b], Placement("m", {"prompt": story + "there was a"})) is a


def test_no_candidates_means_no_placement() -> None:
    assert PrefixPolicy().choose([], chat("tea", 1)) is None


def test_a_restarted_instance_is_forgotten() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    a.supervisor = SupervisorReport(pid=100)
    place(policy, [a, b], chat("tea", 1))
    a.served = 1
    a.supervisor = SupervisorReport(pid=101)  # same id and address, new process
    assert place(policy, [a, b], chat("tea", 2)) is b
    assert "a" not in policy.tree.holders()


def test_the_tree_stays_within_its_bound_under_many_conversations() -> None:
    policy = PrefixPolicy(PrefixSettings(max_nodes=50))
    pool = [instance("a"), instance("b")]
    for n in range(100):
        place(policy, pool, chat(f"topic{n}", 2))
        assert len(policy.tree) <= 50


# -- feedback -------------------------------------------------------------------------------


def test_feedback_that_finds_predicted_prefixes_evicted_lowers_reliability() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    place(policy, [a, b], chat("tea", 1))
    placement = chat("tea", 2)
    assert place(policy, [a, b], placement) is a
    policy.record_cached("a", "m", placement.body, cached_tokens=1, prompt_tokens=60)
    assert policy.reliability("a") < 1.0
    assert policy.reliability("b") == 1.0


def test_feedback_that_confirms_the_prediction_keeps_full_reliability() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    place(policy, [a, b], chat("tea", 1))
    placement = chat("tea", 2)
    place(policy, [a, b], placement)
    text = str(prompt_text(placement.body))
    matched = len(str(prompt_text(chat("tea", 1).body))) // 64 * 64
    policy.record_cached("a", "m", placement.body, matched // 4, len(text) // 4)
    assert policy.reliability("a") == 1.0


def test_an_unreliable_instance_loses_to_a_trusted_shorter_match() -> None:
    policy = PrefixPolicy(PrefixSettings(reliability_floor=0.1, restart_misses=99))
    a, b = instance("a"), instance("b")
    policy.tree.insert(policy.blocks("m", chat("tea", 2).body), "b")
    for _ in range(10):  # a keeps being predicted a long match and found nothing cached
        policy.tree.insert(policy.blocks("m", chat("tea", 3).body), "a")
        policy._predictions[("a", policy.blocks("m", chat("tea", 3).body)[-1])] = 10
        policy.record_cached("a", "m", chat("tea", 3).body, cached_tokens=0, prompt_tokens=200)
    assert policy.reliability("a") < 0.3
    assert place(policy, [a, b], chat("tea", 4)) is b


def test_repeated_misses_forget_an_instance_that_lost_its_cache() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    place(policy, [a, b], chat("tea", 1))
    a.served = 1
    for turns in (2, 3, 4):
        placement = chat("tea", turns)
        assert place(policy, [a, b], placement) is a
        policy.record_cached("a", "m", placement.body, cached_tokens=0, prompt_tokens=100)
    assert "a" not in policy.tree.holders()
    assert policy.reliability("a") == 1.0  # a fresh start


def test_forget_instance_drops_its_prefixes_and_sessions() -> None:
    policy = PrefixPolicy()
    a, b = instance("a"), instance("b")
    place(policy, [a, b], chat("tea", 1, {"X-Session-Id": "s"}))
    a.served = 1
    policy.forget_instance("a")
    assert len(policy.tree) == 0
    assert place(policy, [a, b], chat("tea", 2, {"X-Session-Id": "s"})) is b


def test_feedback_ignores_nonsense_and_unplaced_requests() -> None:
    policy = PrefixPolicy()
    policy.record_cached("x", "m", None, 5, 0)
    policy.record_cached("x", "m", {"prompt": "hello"}, 5, 10)
    policy.record_cached("x", "m", chat("tea", 2).body, 50, 10)
    assert policy.reliability("x") == 1.0


# -- waiting for the cached instance ---------------------------------------------------------


def long_chat(turns: int) -> Placement:
    """A conversation with a long shared document: thousands of characters."""
    document = "clause " * 3000
    messages = [{"role": "system", "content": document}, *conversation("law", turns)]
    return Placement("m", {"messages": messages})


def test_wait_advice_when_the_cached_instance_is_full_and_prefill_costs_more() -> None:
    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=2.0))
    a, b = instance("a", total=2), instance("b", total=2)
    place(policy, [a, b], long_chat(1))
    a.in_flight = 2
    advice = policy.wait_advice([a, b], long_chat(2))
    assert advice is not None
    assert advice.instance_id == "a"
    assert advice.expected_wait_s == pytest.approx(1.0)  # 2 s per request over 2 slots
    assert advice.saved_prefill_s > advice.expected_wait_s
    assert advice.max_wait_s == min(advice.saved_prefill_s, 5.0)


def test_no_wait_advice_when_the_cached_instance_has_a_free_slot_or_prefill_is_cheap() -> None:
    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=2.0))
    a, b = instance("a", total=2), instance("b", total=2)
    place(policy, [a, b], long_chat(1))
    assert policy.wait_advice([a, b], long_chat(2)) is None  # a has a free slot
    a.in_flight = 2
    assert policy.wait_advice([a, b], chat("tea", 1)) is None  # nothing cached anywhere
    fast = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=1e6))
    place(fast, [a, b], long_chat(1))
    assert fast.wait_advice([a, b], long_chat(2)) is None  # re-prefilling is quick


def test_feedback_teaches_the_rates_wait_advice_weighs() -> None:
    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=2.0))
    a, b = instance("a", total=2), instance("b", total=2)
    place(policy, [a, b], long_chat(1))
    a.in_flight = 2
    assert policy.wait_advice([a, b], long_chat(2)) is not None
    body = long_chat(1).body
    for _ in range(40):  # a prefills 100 000 tokens a second: not worth waiting for
        policy.record_cached("a", "m", body, 0, 10_000, prompt_seconds=0.1, total_seconds=2.0)
    assert policy.wait_advice([a, b], long_chat(2)) is None


# -- through the scheduler ------------------------------------------------------------------


def test_through_the_scheduler_a_conversation_sticks_while_others_spread() -> None:
    scheduler = Scheduler(PrefixPolicy())
    scheduler.register_agent("g", "agent")
    snapshot = [
        {"id": name, "url": f"http://{name}", "model": "m", "total_slots": 2, "busy": 0}
        for name in ("x", "y")
    ]
    assert scheduler.apply_snapshot("g", 1, [InstanceReport.from_wire(d) for d in snapshot])
    homes: dict[str, set[str]] = {}
    for turns in (1, 2, 3):
        for topic in ("tea", "rust", "jazz"):  # least_busy would move tea to y in turn 2
            lease = scheduler.try_lease("m", chat(topic, turns))
            assert lease is not None
            homes.setdefault(topic, set()).add(lease.instance.id)
            scheduler.release(lease)
    assert all(len(ids) == 1 for ids in homes.values())
    assert set().union(*homes.values()) == {"g/x", "g/y"}


def _two_instance_scheduler(policy: PrefixPolicy, **options: Any) -> Scheduler:
    scheduler = Scheduler(policy, **options)
    scheduler.register_agent("g", "agent")
    snapshot = [
        {"id": name, "url": f"http://{name}", "model": "m", "total_slots": 1, "busy": 0}
        for name in ("x", "y")
    ]
    assert scheduler.apply_snapshot("g", 1, [InstanceReport.from_wire(d) for d in snapshot])
    return scheduler


async def test_a_turn_waits_for_its_busy_cached_instance_rather_than_prefilling_elsewhere() -> None:
    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=1.0))
    scheduler = _two_instance_scheduler(policy)
    first = scheduler.try_lease("m", long_chat(1))
    assert first is not None
    home = first.instance.id  # x is busy with turn 1; y is free
    task = asyncio.create_task(scheduler.acquire("m", long_chat(2)))
    await asyncio.sleep(0)
    assert not task.done() and scheduler.buffered("m") == 1
    assert policy.decisions["wait_for_cache"] == 1
    # an unrelated request is not held up behind it: it takes the free instance at once
    other = await asyncio.wait_for(scheduler.acquire("m", chat("tea", 1)), 1)
    assert other.instance.id != home
    scheduler.release(first)  # the cached instance frees: the waiting turn goes there
    lease = await asyncio.wait_for(task, 1)
    assert lease.instance.id == home


async def test_the_wait_for_a_cached_instance_is_bounded_then_any_slot_will_do() -> None:
    policy = PrefixPolicy(
        PrefixSettings(prefill_tokens_per_s=500, request_seconds=1.0, max_wait_s=0.05)
    )
    scheduler = _two_instance_scheduler(policy)
    first = scheduler.try_lease("m", long_chat(1))
    assert first is not None
    lease = await asyncio.wait_for(scheduler.acquire("m", long_chat(2)), 2)
    assert lease.instance.id != first.instance.id  # waited 50 ms, then took the free one
    assert policy.decisions["wait_for_cache"] == 1 and policy.decisions["wait_expired"] == 1


async def test_no_wait_when_buffering_is_off_or_the_cached_instance_leaves() -> None:
    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=1.0))
    off = _two_instance_scheduler(policy, max_buffered=0)
    first = off.try_lease("m", long_chat(1))
    assert first is not None
    lease = await asyncio.wait_for(off.acquire("m", long_chat(2)), 1)
    assert lease.instance.id != first.instance.id

    policy = PrefixPolicy(PrefixSettings(prefill_tokens_per_s=500, request_seconds=1.0))
    scheduler = _two_instance_scheduler(policy)
    first = scheduler.try_lease("m", long_chat(1))
    assert first is not None
    task = asyncio.create_task(scheduler.acquire("m", long_chat(2)))
    await asyncio.sleep(0)
    assert not task.done()
    gone = first.instance.id.split("/", 1)[1]
    other = "y" if gone == "x" else "x"
    snapshot = [{"id": other, "url": f"http://{other}", "model": "m", "total_slots": 1}]
    assert scheduler.apply_snapshot(
        "g", 2, [InstanceReport.from_wire(d) for d in snapshot]
    )  # its home went away
    lease = await asyncio.wait_for(task, 1)
    assert lease.instance.id == f"g/{other}"


# -- slot pinning (pin_slots) -----------------------------------------------------------------


def pinnable(topic: str, turns: int, **extra: Any) -> Placement:
    body = {"model": "m", "messages": conversation(topic, turns), **extra}
    return Placement("m", body, {}, pinnable=True)


def _one_instance_scheduler(policy: PrefixPolicy, slots: int) -> Scheduler:
    scheduler = Scheduler(policy)
    scheduler.register_agent("g", "agent")
    snapshot = [{"id": "x", "url": "http://x", "model": "m", "total_slots": slots, "busy": 0}]
    assert scheduler.apply_snapshot("g", 1, [InstanceReport.from_wire(d) for d in snapshot])
    return scheduler


def test_slot_pinning_is_off_unless_asked_for() -> None:
    scheduler = _one_instance_scheduler(PrefixPolicy(), slots=2)
    lease = scheduler.try_lease("m", pinnable("tea", 1))
    assert lease is not None and lease.slot is None
    assert lease.instance.unpinned == 1 and not lease.instance.pinned_slots
    scheduler.release(lease)
    assert lease.instance.unpinned == 0
    assert make_policy("prefix", pin_slots=True).settings.pin_slots  # type: ignore[attr-defined]
    assert load_settings(environ={}, overrides={"pin_slots": True}).pin_slots
    assert build_parser().parse_args(["serve", "--pin-slots"]).pin_slots is True


def test_each_conversation_is_pinned_to_the_slot_that_last_held_it() -> None:
    policy = PrefixPolicy(PrefixSettings(pin_slots=True))
    scheduler = _one_instance_scheduler(policy, slots=3)
    homes: dict[str, set[int | None]] = {}
    for turns in (1, 2, 3):
        for topic in ("tea", "rust", "jazz"):  # one after another: every slot is free
            lease = scheduler.try_lease("m", pinnable(topic, turns))
            assert lease is not None
            homes.setdefault(topic, set()).add(lease.slot)
            scheduler.release(lease)
    assert homes == {"tea": {0}, "rust": {1}, "jazz": {2}}  # never-used slots first
    assert policy.decisions["slot_lru"] == 3 and policy.decisions["slot_match"] == 6


def test_a_busy_home_slot_sends_the_turn_to_the_least_recently_used_free_one() -> None:
    policy = PrefixPolicy(PrefixSettings(pin_slots=True))
    scheduler = _one_instance_scheduler(policy, slots=3)
    for topic in ("tea", "rust", "jazz"):
        lease = scheduler.try_lease("m", pinnable(topic, 1))
        assert lease is not None
        scheduler.release(lease)  # tea on 0, rust on 1, jazz on 2; 0 is least recent
    rust = scheduler.try_lease("m", pinnable("rust", 2))
    assert rust is not None and rust.slot == 1
    other = scheduler.try_lease("m", pinnable("rust", 2, temperature=0.5))
    assert other is not None and other.slot == 0  # rust's slot is busy: the LRU free one
    assert rust.instance.pinned_slots == {0, 1}
    scheduler.release(rust)
    scheduler.release(other)
    assert not rust.instance.pinned_slots


def test_nothing_is_pinned_where_the_slot_picture_is_not_exact() -> None:
    policy = PrefixPolicy(PrefixSettings(pin_slots=True))
    scheduler = _one_instance_scheduler(policy, slots=4)
    # a route that does not run on a slot (or ignores id_slot), a body without a prompt,
    # or a client's own id_slot: llama-server picks
    plain = scheduler.try_lease("m", chat("tea", 1))
    assert plain is not None and plain.slot is None
    own = scheduler.try_lease("m", pinnable("tea", 1, id_slot=3))
    assert own is not None and own.slot is None
    empty = scheduler.try_lease("m", Placement("m", {"input": "x"}, {}, pinnable=True))
    assert empty is not None and empty.slot is None
    # while unpinned requests run there, which slots they took is unknown
    unknown = scheduler.try_lease("m", pinnable("rust", 1))
    assert unknown is not None and unknown.slot is None
    for lease in (plain, own, empty, unknown):
        scheduler.release(lease)
    instance = plain.instance
    assert instance.unpinned == 0 and instance.in_flight == 0
    alone = scheduler.try_lease("m", pinnable("rust", 1))
    assert alone is not None and alone.slot == 0  # all known again: pinned
    scheduler.release(alone)
    instance.apply_report(4, busy=1)  # another client's request busy on some slot
    lease = scheduler.try_lease("m", pinnable("jazz", 1))
    assert lease is not None and lease.slot is None


async def test_a_slot_whose_client_left_is_not_pinned_again_at_once() -> None:
    policy = PrefixPolicy(PrefixSettings(pin_slots=True))
    scheduler = _one_instance_scheduler(policy, slots=2)
    lease = scheduler.try_lease("m", pinnable("tea", 1))
    assert lease is not None and lease.slot == 0
    scheduler.release(lease, outcome="client_gone")  # llama-server may still generate
    assert lease.instance.pinned_slots == {0}
    again = scheduler.try_lease("m", pinnable("tea", 2))
    assert again is not None and again.slot == 1  # not the slot that may still be busy
    scheduler.release(again)
    assert lease.instance.pinned_slots == {0}


def test_a_restarted_instance_forgets_what_its_slots_held() -> None:
    policy = PrefixPolicy(PrefixSettings(pin_slots=True))
    scheduler = _one_instance_scheduler(policy, slots=2)
    for topic in ("tea", "rust"):
        lease = scheduler.try_lease("m", pinnable(topic, 1))
        assert lease is not None
        scheduler.release(lease)
    policy.forget_instance("g/x")
    lease = scheduler.try_lease("m", pinnable("rust", 2))
    assert lease is not None
    assert lease.slot == 0  # nothing known: the first free slot, not rust's old one
    assert policy.decisions["slot_match"] == 0
