"""``--policy prefix`` end to end: conversations stick to the instance holding their cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDictProxy

from tests.support.fleet import Fleet, start_fleet


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(policy="prefix", buffered_request_timeout=5.0)
    try:
        yield fleet
    finally:
        await fleet.close()


def opening(topic: str) -> list[dict[str, Any]]:
    # Distinct from the first word: llama-server (and the fake) give a new prompt the idle
    # slot most similar to it, so a shared system prompt would let one conversation take
    # over another's slot on the same instance (what id_slot pinning would prevent).
    question = f"Tell me about {topic}. " + " ".join(f"{topic}{i}" for i in range(30))
    return [
        {"role": "system", "content": f"{topic} expertise: answer as an expert on {topic}."},
        {"role": "user", "content": question},
    ]


async def test_each_conversation_stays_on_one_instance_and_hits_its_cache(fleet: Fleet) -> None:
    await fleet.add_fake(model="tiny", slots=2)
    await fleet.add_fake(model="tiny", slots=2)
    topics = ["tea", "rust", "jazz"]  # three on two instances: least_busy would move them
    messages = {topic: opening(topic) for topic in topics}
    served: dict[str, set[str]] = {topic: set() for topic in topics}
    cached: dict[str, list[int]] = {topic: [] for topic in topics}
    for turn in range(4):
        for topic in topics:
            status, data, headers = await fleet.post(
                "/v1/chat/completions", {"model": "tiny", "messages": messages[topic]}
            )
            assert status == 200, data
            assert isinstance(headers, CIMultiDictProxy)
            served[topic].add(headers["X-Corral-Instance"])
            cached[topic].append(data["usage"]["prompt_tokens_details"]["cached_tokens"])
            answer = data["choices"][0]["message"]["content"]
            messages[topic] += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"And more on {topic}, part {turn}, please."},
            ]
    assert all(len(instances) == 1 for instances in served.values()), served
    assert len(set().union(*served.values())) == 2  # the conversations spread too
    for topic in topics:
        assert all(n > 0 for n in cached[topic][1:]), (topic, cached[topic])


async def test_a_session_header_keeps_different_prompts_on_one_instance(fleet: Fleet) -> None:
    await fleet.add_fake(model="tiny", slots=4)
    await fleet.add_fake(model="tiny", slots=4)
    served: dict[str, set[str]] = {"a": set(), "b": set()}
    for turn in range(6):
        for session in ("a", "a", "b"):  # not alternating: turn-taking can't fake affinity
            status, _, headers = await fleet.post(
                "/v1/chat/completions",
                {"model": "tiny", "messages": [{"role": "user", "content": f"q{turn}{session}"}]},
                {"X-Session-Id": session},
            )
            assert status == 200
            served[session].add(headers["X-Corral-Instance"])
    assert len(served["a"]) == 1 and len(served["b"]) == 1
    assert served["a"] != served["b"]  # and the sessions were still spread


async def test_a_clients_own_id_slot_reaches_the_server(fleet: Fleet) -> None:
    # corral does not pin slots itself (see the prefix policy's docstring), but a client
    # that pins one gets it: the body is forwarded as sent.
    await fleet.add_fake(model="tiny", slots=4)
    used = []
    for slot in (2, 0, 3, 2):
        status, data, _ = await fleet.post(
            "/completion", {"model": "tiny", "prompt": f"pinned to {slot}", "id_slot": slot}
        )
        assert status == 200, data
        used.append(data["id_slot"])
    assert used == [2, 0, 3, 2]


async def test_pinned_requests_run_on_the_slot_corral_chose() -> None:
    fleet = await start_fleet(policy="prefix", pin_slots=True)
    try:
        node = await fleet.add_fake(model="tiny", slots=3)
        # someone else's prompt on slot 0, behind corral's back: left to itself the
        # server would now put a new prompt on a fresh slot (1), not on 0
        assert fleet.http is not None
        direct = str(node.server.make_url("/completion"))
        async with fleet.http.post(direct, json={"prompt": "zz " * 30, "n_predict": 1}) as r:
            assert (await r.json())["id_slot"] == 0
        prompts = {
            topic: f"{topic} " + " ".join(f"{topic}{i}" for i in range(40)) for topic in ("a", "b")
        }
        slots: dict[str, set[str]] = {"a": set(), "b": set()}
        for turn in range(3):
            for topic, prompt in prompts.items():
                prompts[topic] = prompt + f" more {topic} {turn}"
                status, data, headers = await fleet.post(
                    "/completion", {"model": "tiny", "prompt": prompts[topic], "n_predict": 2}
                )
                assert status == 200, data
                assert str(data["id_slot"]) == headers["X-Corral-Slot"]  # the pin was honoured
                slots[topic].add(headers["X-Corral-Slot"])
        assert slots == {"a": {"0"}, "b": {"1"}}
        # embeddings do not run on a pinned slot (the route ignores id_slot)
        status, _, headers = await fleet.post("/v1/embeddings", {"model": "tiny", "input": "x"})
        assert status == 200 and "X-Corral-Slot" not in headers
    finally:
        await fleet.close()
