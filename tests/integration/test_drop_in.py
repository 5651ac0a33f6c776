"""Drop-in: what works against one llama-server works through the balancer (issue 24).

Fake llama-servers here, for speed and timing control; ``tests/real/test_drop_in_real.py``
runs the same families against the real llama-server, side by side with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.fleet import CHAT, MANAGEMENT_TOKEN, Fleet, start_fleet
from tests.support.waiting import wait_for


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(buffered_request_timeout=10.0)
    try:
        yield fleet
    finally:
        await fleet.close()


async def get(fleet: Fleet, path: str, base: str | None = None) -> tuple[int, Any]:
    assert fleet.http is not None
    async with fleet.http.get((base or fleet.base) + path) as response:
        return response.status, await response.json(content_type=None)


async def test_with_one_model_any_name_reaches_it_and_the_answer_names_it(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=1)
    for name in ("gpt-3.5-turbo", "test", "TheBloke/Some-Model-GGUF", ""):
        status, body, headers = await fleet.chat(name)
        assert status == 200, (name, body)
        assert headers["X-Corral-Instance"] == fleet.balancer.scheduler.fleet.pool("alpha")[0].id
    await fleet.add_fake(model="beta", slots=1)
    status, body, _ = await fleet.chat("gpt-3.5-turbo")
    assert status == 404 and "alpha" in body["error"]["message"]


async def test_default_model_takes_unknown_and_missing_names_among_several() -> None:
    fleet = await start_fleet(default_model="beta")
    try:
        await fleet.add_fake(model="alpha", slots=1)
        beta = await fleet.add_fake(model="beta", slots=1)
        for name in ("gpt-4o-mini", None):
            status, body, _ = await fleet.chat(name)
            assert status == 200, body
        assert beta.fake.counters.requests_served == 2
        status, _, _ = await fleet.chat("alpha")
        assert status == 200 and beta.fake.counters.requests_served == 2
    finally:
        await fleet.close()


async def test_routes_that_take_no_slot_answer_while_every_slot_is_busy(fleet: Fleet) -> None:
    """llama-server answers /props, /slots, /metrics, /tokenize and the like in its HTTP
    thread; through corral they must not wait in the buffer for a slot."""
    node = await fleet.add_fake(model="alpha", slots=1, token_delay=0.1, tokens=40)
    running = asyncio.create_task(fleet.chat("alpha"))
    await wait_for(lambda: node.fake.counters.in_flight == 1, "the chat to take the only slot")
    status, props = await get(fleet, "/props")
    assert status == 200 and props["total_slots"] == 1
    status, slots = await get(fleet, "/slots")
    assert status == 200 and [s["is_processing"] for s in slots] == [True]
    status, _, _ = await fleet.post("/tokenize", {"content": "hello there"})
    assert status == 200
    assert fleet.http is not None
    async with fleet.http.get(fleet.base + "/metrics") as response:
        assert response.status == 200 and "llamacpp:" in await response.text()
    assert not running.done()  # all of that while the slot was busy
    assert node.fake.counters.in_flight == 1
    status, _, _ = await running
    assert status == 200


async def test_slots_is_the_instance_own_and_the_aggregate_moved(fleet: Fleet) -> None:
    node = await fleet.add_fake(model="alpha", slots=2)
    status, slots = await get(fleet, "/slots")
    status_direct, direct = await get(fleet, "/slots", base=node.url)
    assert status == status_direct == 200
    assert [sorted(s) for s in slots] == [sorted(s) for s in direct]
    assert [s["id"] for s in slots] == [0, 1]
    status, _ = await get(fleet, "/corral/slots")
    assert status == 404  # the aggregate is off by default ...
    assert fleet.http is not None
    async with fleet.http.get(
        fleet.management + "/api/v1/instances",
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
    ) as response:  # ... and always on the management API
        instances = await response.json()
    assert [i["slots_total"] for i in instances["instances"]] == [2]


async def test_expose_slots_puts_the_aggregate_under_corral() -> None:
    fleet = await start_fleet(expose_slots=True)
    try:
        await fleet.add_fake(model="alpha", slots=3)
        status, body = await get(fleet, "/corral/slots")
        assert status == 200 and [i["slots_total"] for i in body] == [3]
        status, slots = await get(fleet, "/slots")
        assert status == 200 and len(slots) == 3  # still llama-server's own
    finally:
        await fleet.close()


async def test_a_no_slots_server_serves_and_its_metrics_show_other_clients_load(
    fleet: Fleet,
) -> None:
    node = await fleet.add_fake(
        model="alpha", slots=1, slots_endpoint=False, token_delay=0.05, tokens=40
    )
    status, body, _ = await fleet.chat("alpha")
    assert status == 200, body
    (instance,) = fleet.balancer.scheduler.fleet.instances.values()
    assert instance.slot_source == "metrics"
    assert fleet.http is not None
    direct = asyncio.create_task(
        fleet.http.post(
            node.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
    )
    await wait_for(lambda: instance.busy_slots == 1, "the direct client's slot to show")
    assert instance.in_flight == 0  # seen through /metrics, not through this balancer
    response = await direct
    await response.read()
    response.release()


async def test_keys_only_on_llama_server_the_client_key_reaches_it(fleet: Fleet) -> None:
    """corral checks no key, so it cannot keep one: llama-server checks the client's."""
    await fleet.add_fake(model="alpha", api_keys=("server-key",), agent_key="server-key")
    status, body, _ = await fleet.chat("alpha")
    assert status == 401, body  # llama-server's own refusal, passed through
    for headers in ({"Authorization": "Bearer server-key"}, {"x-api-key": "server-key"}):
        status, body, _ = await fleet.post("/v1/chat/completions", CHAT, headers)
        assert status == 200, (headers, body)


async def test_keys_at_corral_and_on_llama_server_each_checks_its_own() -> None:
    fleet = await start_fleet(api_keys=["client-key"], llama_server_api_key="server-key")
    try:
        await fleet.add_fake(model="alpha", api_keys=("server-key",), agent_key="server-key")
        status, body, _ = await fleet.post(
            "/v1/chat/completions", CHAT, {"Authorization": "Bearer client-key"}
        )
        assert status == 200, body  # corral sent llama-server's key in place of the client's
        for headers in ({}, {"Authorization": "Bearer server-key"}):
            status, body, _ = await fleet.post("/v1/chat/completions", CHAT, headers)
            assert status == 401 and "send `Authorization" in body["error"]["message"], body
        assert fleet.http is not None
        async with fleet.http.get(
            fleet.base + "/props", headers={"x-api-key": "client-key"}
        ) as response:
            assert response.status == 200  # a slotless route gets the server's key too
    finally:
        await fleet.close()


async def test_keys_only_at_corral_never_reach_llama_server() -> None:
    fleet = await start_fleet(api_keys=["client-key"])
    try:
        node = await fleet.add_fake(model="alpha")
        status, body, _ = await fleet.post(
            "/v1/chat/completions", CHAT, {"Authorization": "Bearer client-key"}
        )
        assert status == 200, body
        assert all(
            "client-key" not in " ".join(headers.values()) for headers in node.fake.request_headers
        )
    finally:
        await fleet.close()


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


async def cors(fleet: Fleet, method: str, path: str, origin: str) -> tuple[int, dict[str, str]]:
    assert fleet.http is not None
    headers = {"Origin": origin, **(PREFLIGHT if method == "OPTIONS" else {})}
    async with fleet.http.request(method, fleet.base + path, headers=headers) as response:
        await response.read()
        found = {
            k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")
        }
        return response.status, found


async def test_without_cors_settings_the_instance_answers_cors_as_llama_server() -> None:
    fleet = await start_fleet(api_keys=["client-key"])  # a preflight carries no key
    try:
        node = await fleet.add_fake(model="alpha", slots=1, token_delay=0.1, tokens=40)
        running = asyncio.create_task(
            fleet.post("/v1/chat/completions", CHAT, {"x-api-key": "client-key"})
        )
        await wait_for(lambda: node.fake.counters.in_flight == 1, "the only slot to be taken")
        for origin in ("http://localhost:3000", "https://anywhere.example"):
            status, headers = await cors(fleet, "OPTIONS", "/v1/chat/completions", origin)
            assert status == 200, headers  # while the only slot is busy, too
            assert headers["Access-Control-Allow-Origin"] == origin
            assert headers["Access-Control-Allow-Credentials"] == "true"
        assert not running.done()
        assert (await running)[0] == 200
    finally:
        await fleet.close()


async def test_with_cors_settings_corral_rules_and_the_instance_headers_are_dropped() -> None:
    fleet = await start_fleet(cors_origins=["https://app.example"])
    try:
        await fleet.add_fake(model="alpha")
        status, headers = await cors(
            fleet, "OPTIONS", "/v1/chat/completions", "https://app.example"
        )
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
        status, headers = await cors(
            fleet, "OPTIONS", "/v1/chat/completions", "https://evil.example"
        )
        assert status == 403 and headers == {}
        status, headers = await cors(fleet, "GET", "/props", "https://evil.example")
        assert status == 200 and headers == {}  # the fake reflected it; corral dropped it
        status, headers = await cors(fleet, "GET", "/props", "https://app.example")
        assert headers == {"Access-Control-Allow-Origin": "https://app.example"}
    finally:
        await fleet.close()


async def test_slotless_routes_take_model_and_instance_to_pick_one(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=1)
    first = await fleet.add_fake(model="beta", slots=3)
    second = await fleet.add_fake(model="beta", slots=3)
    status, slots = await get(fleet, "/slots?model=beta")
    assert status == 200 and len(slots) == 3
    assert fleet.http is not None
    pool = {i.url: i.id for i in fleet.balancer.scheduler.fleet.pool("beta")}
    for node in (first, second):
        wanted = pool[node.url]
        for _ in range(3):
            async with fleet.http.get(
                fleet.base + "/slots?model=beta", headers={"X-Corral-Instance": wanted}
            ) as response:
                assert response.status == 200
                assert response.headers["X-Corral-Instance"] == wanted
        seen = [{k.lower() for k in h} for h in node.fake.request_headers]
        assert not any("x-corral-instance" in h for h in seen)  # corral's own header
    async with fleet.http.get(
        fleet.base + "/slots?model=beta", headers={"X-Corral-Instance": "nope/0"}
    ) as response:
        assert response.status == 404
        assert "nope/0" in (await response.json())["error"]["message"]
