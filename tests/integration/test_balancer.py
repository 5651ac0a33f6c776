"""The balancer end to end: real HTTP in and out, real agents, fake llama-servers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from corral.testing.fake_llama_server import SERVER_KEY, FakeLlamaServer, Fault
from tests.support.fleet import CHAT, CLUSTER_TOKEN, MANAGEMENT_TOKEN, Fleet, start_fleet
from tests.support.waiting import wait_for


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(buffered_request_timeout=5.0)
    try:
        yield fleet
    finally:
        await fleet.close()


async def test_openai_client_gets_chat_completions_plain_and_streamed(fleet: Fleet) -> None:
    await fleet.add_fake(model="tiny", slots=2)
    client = openai.AsyncOpenAI(base_url=fleet.base + "/v1", api_key="unused", max_retries=0)
    try:
        plain = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}]
        )
        assert plain.choices[0].message.content
        assert plain.model == "tiny"
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
    finally:
        await client.close()


async def test_requests_spread_by_free_slots_across_instances(fleet: Fleet) -> None:
    big = await fleet.add_fake(model="m", slots=3, token_delay=0.05, tokens=6)
    small = await fleet.add_fake(model="m", slots=1, token_delay=0.05, tokens=6)
    results = await asyncio.gather(*(fleet.chat("m") for _ in range(8)))
    assert all(status == 200 for status, _, _ in results)
    served = collections.Counter(headers["X-Corral-Instance"] for _, _, headers in results)
    assert sum(served.values()) == 8
    # never more requests on an instance than it has slots
    assert big.fake.counters.max_in_flight <= 3
    assert small.fake.counters.max_in_flight <= 1
    assert big.fake.counters.requests_served > small.fake.counters.requests_served


async def test_one_slot_is_never_oversubscribed_under_256_concurrent_requests(
    fleet: Fleet,
) -> None:
    await fleet.balancer.stop()
    fleet.balancer = (await start_fleet(max_buffered_requests=300)).balancer
    node = await fleet.add_fake(model="m", slots=1, tokens=1)
    results = await asyncio.gather(*(fleet.chat("m", max_tokens=1) for _ in range(256)))
    statuses = collections.Counter(status for status, _, _ in results)
    assert statuses == {200: 256}
    assert node.fake.counters.max_in_flight == 1
    assert node.fake.counters.requests_served == 256


async def test_requests_wait_in_the_buffer_until_a_slot_frees(fleet: Fleet) -> None:
    node = await fleet.add_fake(model="m", slots=1, token_delay=0.05, tokens=5)
    results = await asyncio.gather(*(fleet.chat("m") for _ in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert node.fake.counters.max_in_flight == 1


async def test_full_buffer_answers_429_with_retry_after() -> None:
    fleet = await start_fleet(max_buffered_requests=2, buffered_request_timeout=5.0)
    try:
        await fleet.add_fake(model="m", slots=1, token_delay=0.2, tokens=5)
        first = asyncio.create_task(fleet.chat("m"))
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1,
            "the slot to be taken",
        )
        waiting = [asyncio.create_task(fleet.chat("m")) for _ in range(2)]
        await wait_for(lambda: fleet.balancer.scheduler.buffered("m") == 2, "a full buffer")
        status, body, headers = await fleet.chat("m")
        assert status == 429
        assert body["error"]["type"] == "rate_limit_error"
        assert "buffer is full" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        assert [r[0] for r in await asyncio.gather(first, *waiting)] == [200, 200, 200]
    finally:
        await fleet.close()


async def test_buffered_request_times_out_with_504() -> None:
    fleet = await start_fleet(buffered_request_timeout=0.3)
    try:
        await fleet.add_fake(model="m", slots=1, token_delay=0.3, tokens=5)
        first = asyncio.create_task(fleet.chat("m"))
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1,
            "the slot to be taken",
        )
        status, body, _ = await fleet.chat("m")
        assert status == 504
        assert body["error"]["type"] == "timeout_error"
        assert (await first)[0] == 200
    finally:
        await fleet.close()


async def test_buffering_off_answers_503_at_once() -> None:
    fleet = await start_fleet(max_buffered_requests=0)
    try:
        await fleet.add_fake(model="m", slots=1, token_delay=0.2, tokens=5)
        first = asyncio.create_task(fleet.chat("m"))
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1,
            "the slot to be taken",
        )
        status, body, _ = await fleet.chat("m")
        assert status == 503
        assert "buffering is off" in body["error"]["message"]
        assert (await first)[0] == 200
    finally:
        await fleet.close()


async def test_client_that_leaves_the_buffer_frees_its_place_at_once() -> None:
    fleet = await start_fleet(max_buffered_requests=1, buffered_request_timeout=30.0)
    try:
        await fleet.add_fake(model="m", slots=1, token_delay=0.1, tokens=10)
        first = asyncio.create_task(fleet.chat("m"))
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1,
            "the slot to be taken",
        )
        # a separate client whose connection we close while it waits
        async with aiohttp.ClientSession() as impatient:
            leaving = asyncio.create_task(
                impatient.post(fleet.base + "/v1/chat/completions", json={**CHAT, "model": "m"})
            )
            await wait_for(lambda: fleet.balancer.scheduler.buffered("m") == 1, "one buffered")
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
        await wait_for(lambda: fleet.balancer.scheduler.buffered("m") == 0, "the buffer to empty")
        # its place is reused: another request can wait there now
        status, _, _ = await fleet.chat("m")
        assert status == 200
        assert (await first)[0] == 200
    finally:
        await fleet.close()


async def test_a_request_sent_before_any_instance_is_served_when_one_appears(
    fleet: Fleet,
) -> None:
    pending = asyncio.create_task(fleet.chat("late"))
    await wait_for(lambda: fleet.balancer.scheduler.buffered() == 1, "the request to buffer")
    await fleet.add_fake(model="late", slots=1)
    status, body, _ = await pending
    assert status == 200
    assert body["model"] == "late"


async def test_unknown_model_is_404_listing_served_models(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=1)
    await fleet.add_fake(model="beta", slots=1)
    status, body, _ = await fleet.chat("gamma")
    assert status == 404
    assert body["error"]["type"] == "not_found_error"
    assert "alpha" in body["error"]["message"] and "beta" in body["error"]["message"]


async def test_model_is_required_only_when_several_are_served(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=1)
    status, body, _ = await fleet.chat()
    assert status == 200 and body["model"] == "alpha"
    await fleet.add_fake(model="beta", slots=1)
    status, body, _ = await fleet.chat()
    assert status == 400
    assert "alpha" in body["error"]["message"]


async def test_model_header_wins_over_body_and_query(fleet: Fleet) -> None:
    await fleet.add_fake(model="alpha", slots=1)
    await fleet.add_fake(model="beta", slots=1)
    status, body, _ = await fleet.post(
        "/v1/chat/completions?model=alpha", {**CHAT, "model": "alpha"}, {"X-Model-Id": "beta"}
    )
    assert status == 200 and body["model"] == "beta"
    status, body, _ = await fleet.post("/v1/chat/completions?model=beta", CHAT)
    assert status == 200 and body["model"] == "beta"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": 7, "messages": []}', "`model` must be a string"),
    ],
)
async def test_bad_bodies_get_a_400_in_openai_shape(fleet: Fleet, raw: bytes, message: str) -> None:
    await fleet.add_fake(model="m", slots=1)
    assert fleet.http is not None
    async with fleet.http.post(
        fleet.base + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    ) as response:
        body = await response.json()
    assert response.status == 400
    assert body["error"]["code"] == 400
    assert message in body["error"]["message"]


async def test_body_over_the_limit_is_413() -> None:
    fleet = await start_fleet(max_request_body_bytes=1024)
    try:
        await fleet.add_fake(model="m", slots=1)
        status, body, _ = await fleet.chat("m", padding="x" * 4096)
        assert status == 413
        assert body["error"]["code"] == 413
    finally:
        await fleet.close()


async def test_api_keys_are_required_when_configured() -> None:
    fleet = await start_fleet(api_keys=["k1", "k2"])
    try:
        await fleet.add_fake(model="m", slots=1)
        status, body, _ = await fleet.chat("m")
        assert status == 401
        assert body["error"]["type"] == "authentication_error"
        status, _, _ = await fleet.post(
            "/v1/chat/completions", {**CHAT, "model": "m"}, {"Authorization": "Bearer k2"}
        )
        assert status == 200
        status, _, _ = await fleet.post(
            "/v1/chat/completions", {**CHAT, "model": "m"}, {"x-api-key": "wrong"}
        )
        assert status == 401
    finally:
        await fleet.close()


async def test_every_inference_route_but_health_requires_the_key() -> None:
    """Every route the front door has (its router's, not a list kept here), with
    every method it takes: 401 without a key; /health answers anyone."""
    fleet = await start_fleet(api_keys=["k1"], expose_slots=True)
    try:
        await fleet.add_fake(model="m", slots=1)
        gateway = fleet.balancer.gateway
        assert gateway is not None and fleet.http is not None
        routes = {
            (r.method, r.resource.canonical.replace("{tail}", "some/page"))
            for r in gateway.app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
        assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models") in routes
        for method, path in sorted(routes):
            if path in ("/health", "/v1/health"):
                continue
            for verb in ("GET", "POST", "DELETE") if method == "*" else (method,):
                async with fleet.http.request(verb, fleet.base + path, json={}) as response:
                    assert response.status == 401, (verb, path)
                    assert (await response.json())["error"]["type"] == "authentication_error"
        for path in ("/health", "/v1/health"):
            async with fleet.http.get(fleet.base + path) as response:
                assert response.status == 200, path
    finally:
        await fleet.close()


def fake_of(server: TestServer) -> FakeLlamaServer:
    return server.app[SERVER_KEY]


async def test_a_refusing_instance_is_skipped_and_the_request_retried(fleet: Fleet) -> None:
    bad = fake_of(await fleet.add_unwatched_fake("m", slots=4))
    good = await fleet.add_fake(model="m", slots=1)
    bad.refusing = True  # accepts nothing from now on
    results = [await fleet.chat("m") for _ in range(3)]
    assert [r[0] for r in results] == [200, 200, 200]
    assert good.fake.counters.requests_served == 3
    (bad_instance,) = [i for i in fleet.balancer.scheduler.fleet.pool("m") if i.total_slots == 4]
    assert bad_instance.breaker.failures >= 1


async def test_upstream_503_before_first_byte_is_retried_elsewhere(fleet: Fleet) -> None:
    first = fake_of(await fleet.add_unwatched_fake("m", slots=4))
    second = await fleet.add_fake(model="m", slots=1)
    first.started_at = time.monotonic() + 3600  # "Loading model" again: 503s
    status, body, _ = await fleet.chat("m")
    assert status == 200, body
    assert second.fake.counters.requests_served == 1
    assert first.counters.requests_served == 0


async def test_every_instance_failing_gives_a_502_naming_them() -> None:
    fleet = await start_fleet(buffered_request_timeout=0.5)
    try:
        fake_of(await fleet.add_unwatched_fake("m", slots=1)).refusing = True
        status, body, _ = await fleet.chat("m")
        assert status == 502
        assert "failed before answering" in body["error"]["message"]
        assert "manual-0/0" in body["error"]["message"]
    finally:
        await fleet.close()


async def test_failure_mid_stream_ends_the_stream_with_an_error_event(fleet: Fleet) -> None:
    node = await fleet.add_fake(model="m", slots=1, tokens=20, token_delay=0.01)
    await node.fake.set_fault(Fault.EXIT_MID_STREAM, 1)
    assert fleet.http is not None
    async with fleet.http.post(
        fleet.base + "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
    ) as response:
        assert response.status == 200
        raw = (await response.read()).decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events, raw
    assert '"error"' in events[-1]
    assert "failed mid-stream" in events[-1]


async def test_a_stream_silent_longer_than_the_idle_timeout_ends_with_an_error_event() -> None:
    fleet = await start_fleet(upstream_idle_timeout=0.3)
    try:
        node = await fleet.add_fake(model="m", slots=1, tokens=3, token_delay=1.0)
        assert fleet.http is not None
        started = time.monotonic()
        async with fleet.http.post(
            fleet.base + "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
        ) as response:
            assert response.status == 200
            raw = (await response.read()).decode()
        took = time.monotonic() - started
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.startswith("data: ")]
        assert '"error"' in events[-1], raw
        assert "timed out" in events[-1]
        assert took < 2.5, took  # it did not wait for the 3 tokens (3 s)
        instances = fleet.balancer.scheduler.fleet.instances.values()
        await wait_for(
            lambda: sum(i.in_flight for i in instances) == 0, "the slot freed after the timeout"
        )
        assert node.fake.counters.requests_served <= 1
    finally:
        await fleet.close()


async def test_a_steady_stream_longer_than_the_idle_timeout_is_not_cut() -> None:
    # 10 tokens 0.1 s apart (1 s in all) under a 0.3 s idle timeout: each gap is shorter
    fleet = await start_fleet(upstream_idle_timeout=0.3)
    try:
        await fleet.add_fake(model="m", slots=1, tokens=10, token_delay=0.1)
        assert fleet.http is not None
        async with fleet.http.post(
            fleet.base + "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
        ) as response:
            raw = (await response.read()).decode()
        assert '"error"' not in raw, raw
        assert raw.rstrip().endswith("data: [DONE]")
    finally:
        await fleet.close()


async def test_a_stream_leaves_a_spare_connection_for_the_next_request(fleet: Fleet) -> None:
    # The fake closes a connection after a stream, as llama-server does. corral opens a
    # spare one (GET /health) while a stream runs, so the next request needs no connect.
    node = await fleet.add_fake(model="m", slots=2, tokens=4, token_delay=0.02)
    assert fleet.http is not None
    for _ in range(4):
        async with fleet.http.post(
            fleet.base + "/v1/chat/completions", json={**CHAT, "model": "m", "stream": True}
        ) as response:
            assert response.status == 200
            assert (await response.read()).decode().rstrip().endswith("data: [DONE]")
    chats = [
        requests
        for requests in node.fake.connections.values()
        if "POST /v1/chat/completions" in requests
    ]
    assert len(chats) == 4  # one connection per stream: each was closed after it
    # every stream after the first came on a connection opened before it was sent
    assert chats[0] == ["POST /v1/chat/completions"], chats
    assert all(c == ["GET /health", "POST /v1/chat/completions"] for c in chats[1:]), chats


async def test_instance_leaves_the_pool_when_its_agent_disconnects(fleet: Fleet) -> None:
    node = await fleet.add_fake(model="m", slots=1)
    await node.stop_agent()
    await wait_for(lambda: not fleet.balancer.scheduler.fleet.instances, "the instance to leave")


async def test_instance_leaves_the_pool_after_missed_reports() -> None:
    fleet = await start_fleet(agent_report_timeout=0.5, buffered_request_timeout=0.5)
    try:
        await fleet.add_unwatched_fake("m", slots=1)  # reported once, then never again
        assert fleet.usable() == 1
        await wait_for(lambda: fleet.usable() == 0, "the instance to go stale")
        status, _, _ = await fleet.chat("m")
        assert status == 504  # known model, no usable instance: it waited, then timed out
    finally:
        await fleet.close()


async def _get(fleet: Fleet, path: str, token: str | None) -> tuple[int, Any]:
    assert fleet.http is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with fleet.http.get(fleet.management + path, headers=headers) as response:
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/fleet",
        "/api/v1/agents",
        "/api/v1/instances",
        "/api/v1/buffer",
        "/api/v1/autoscaling",
        "/metrics",
    ],
)
async def test_every_management_route_requires_the_token(fleet: Fleet, path: str) -> None:
    assert fleet.http is not None
    for token in (None, "wrong", CLUSTER_TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with fleet.http.get(fleet.management + path, headers=headers) as response:
            assert response.status == 401
            body = await response.json()
            assert body["error"]["type"] == "authentication_error"
    async with fleet.http.get(
        fleet.management + path, headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    ) as response:
        assert response.status == 200


async def test_management_api_shows_instances_and_slots(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=3)
    status, body = await _get(fleet, "/api/v1/fleet", MANAGEMENT_TOKEN)
    assert status == 200
    (instance,) = body["instances"]
    assert instance["model"] == "m"
    assert instance["slots_total"] == 3
    assert instance["state"] == "ready"
    assert body["models"] == ["m"]


async def test_metrics_count_responses_and_slots(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=2)
    assert (await fleet.chat("m"))[0] == 200
    assert fleet.http is not None
    async with fleet.http.get(
        fleet.management + "/metrics", headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    ) as response:
        text = await response.text()
    assert 'corral_responses_total{model="m",route="/v1/chat/completions",status="200"} 1.0' in text
    assert "corral_slots_total{" in text


async def test_health_reports_ready_instances_and_free_slots(fleet: Fleet) -> None:
    assert fleet.http is not None
    async with fleet.http.get(fleet.base + "/health") as response:
        assert response.status == 503
    await fleet.add_fake(model="m", slots=2)
    async with fleet.http.get(fleet.base + "/health") as response:
        body = await response.json()
        assert response.status == 200
        assert body["slots_free"] == 2


async def test_graceful_stop_lets_in_flight_requests_finish() -> None:
    fleet = await start_fleet()
    await fleet.add_fake(model="m", slots=1, token_delay=0.05, tokens=10)
    running = asyncio.create_task(fleet.chat("m"))
    await wait_for(
        lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1, "the request to start"
    )
    await fleet.balancer.stop()
    status, body, _ = await running
    assert status == 200, body
    for node in fleet.nodes:
        await node.stop_agent()
        await node.server.close()
    assert fleet.http is not None
    await fleet.http.close()


async def test_probes_answer_without_a_token_and_readiness_ends_when_draining_begins() -> None:
    fleet = await start_fleet()
    assert fleet.http is not None
    probe = aiohttp.ClientSession()  # no token: a kubelet sends none
    try:
        for path, word in (("/livez", "alive"), ("/readyz", "ready")):
            async with probe.get(fleet.management + path) as response:
                assert response.status == 200
                assert await response.json() == {"status": word}
        # no instance at all is still ready: requests buffer (scale from zero)
        assert not fleet.balancer.scheduler.fleet.instances
        # the rest of the management API still wants its token
        async with probe.get(fleet.management + "/api/v1/fleet") as response:
            assert response.status == 401
        await fleet.add_fake(model="m", slots=1, token_delay=0.05, tokens=20)
        running = asyncio.create_task(fleet.chat("m"))
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1, "the request"
        )
        stopping = asyncio.create_task(fleet.balancer.stop())
        await wait_for(lambda: fleet.balancer.probes.stopping, "the stop to begin")
        async with probe.get(fleet.management + "/readyz") as response:
            assert response.status == 503
            assert "draining" in (await response.json())["reason"]
        async with probe.get(fleet.management + "/livez") as response:
            assert response.status == 200
        status, body, _ = await running
        assert status == 200, body
        await stopping
    finally:
        await probe.close()
        for node in fleet.nodes:
            await node.stop_agent()
            await node.server.close()
        await fleet.http.close()


async def test_statsd_receives_slot_and_buffer_gauges() -> None:
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Listener(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.put_nowait(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    fleet = await start_fleet(statsd_addr=f"127.0.0.1:{port}", statsd_prefix="lb")
    try:
        await fleet.add_fake(model="m", slots=3)

        async def has_slots() -> bool:
            lines = (await asyncio.wait_for(received.get(), 5)).decode().splitlines()
            return "lb.slots_idle:3|g" in lines and "lb.model.m.slots_idle:3|g" in lines

        await wait_for(has_slots, "a datagram with 3 idle slots")
    finally:
        await fleet.close()
        transport.close()


async def test_event_stream_sends_the_fleet_then_changes(fleet: Fleet) -> None:
    assert fleet.http is not None
    headers = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    async with fleet.http.get(fleet.management + "/api/v1/events", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first.startswith(b"event: fleet\ndata: ")
        assert json.loads(first.split(b"data: ", 1)[1])["instances"] == []
        await fleet.add_fake(model="m", slots=1)
        seen = b""
        async with asyncio.timeout(5):
            while b"event: agent" not in seen:
                seen += await response.content.readuntil(b"\n\n")
        assert b'"event": "connected"' in seen


async def test_cached_and_uncached_prompt_tokens_are_counted_per_instance(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=1)
    long_prompt = "the same long system prompt " * 20
    for stream in (False, True):
        status, _, _ = await fleet.chat(
            "m", messages=[{"role": "user", "content": long_prompt}], stream=stream
        )
        assert status == 200
    metric = fleet.balancer.metrics.prompt_tokens
    instance = fleet.balancer.scheduler.fleet.pool("m")[0].id
    cached = metric.labels("m", instance, "cached")._value.get()
    uncached = metric.labels("m", instance, "uncached")._value.get()
    assert uncached > 0  # the first request paid its prefill
    assert cached > 0  # the repeat (streamed) was served from the slot's cache
