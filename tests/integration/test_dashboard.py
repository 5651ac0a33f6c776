"""The dashboard's server side: static files without data, data only with the token,
and one live stream of the whole fleet and its recent traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.control.dashboard import ASSETS
from tests.support.events import events as sse_events
from tests.support.fleet import CHAT, MANAGEMENT_TOKEN, Fleet, start_fleet

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet()
    try:
        yield fleet
    finally:
        await fleet.close()


async def test_page_and_assets_are_served_without_a_token_and_locked_down(fleet: Fleet) -> None:
    assert fleet.http is not None
    for path in ["/dashboard", "/dashboard/", *(f"/dashboard/{name}" for name in ASSETS)]:
        async with fleet.http.get(fleet.management + path) as response:
            assert response.status == 200, path
            body = await response.text()
            assert body.strip(), path
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert response.headers["X-Frame-Options"] == "DENY"
    async with fleet.http.get(fleet.management + "/dashboard") as response:
        html = await response.text()
    assert response.headers["Content-Type"].startswith("text/html")
    assert '<script src="/dashboard/app.js"' in html and "<script>" not in html


async def test_everything_else_still_needs_the_token(fleet: Fleet) -> None:
    assert fleet.http is not None
    for path in [
        "/api/v1/dashboard/stream",
        "/api/v1/traffic",
        "/dashboard/../api/v1/fleet",
        "/dashboard/secrets.txt",
        "/dashboard/app.js/../../api/v1/fleet",
    ]:
        async with fleet.http.get(fleet.management + path) as response:
            assert response.status == 401, path
            assert (await response.json())["error"]["type"]


async def test_stream_shows_instances_coming_and_going_and_traffic(fleet: Fleet) -> None:
    assert fleet.http is not None
    async with fleet.http.get(
        fleet.management + "/api/v1/dashboard/stream", headers=AUTH
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        events = sse_events(response)
        first = await anext(events)
        assert first.kind == "fleet"
        assert first.data["instances"] == [] and first.data["catalog"] is None
        traffic = await anext(events)
        assert traffic.kind == "traffic" and traffic.data["models"] == {}

        node = await fleet.add_fake(model="alpha", slots=3)

        async def until(predicate: Any, what: str) -> dict[str, Any]:
            async with asyncio.timeout(10):
                async for event in events:
                    if predicate(event.kind, event.data):
                        return dict(event.data)
            raise AssertionError(what)

        view = await until(lambda k, d: k == "fleet" and d["instances"], "the instance")
        (instance,) = view["instances"]
        assert instance["model"] == "alpha" and instance["slots_total"] == 3
        assert instance["seen_since"] <= view["time"]

        for _ in range(3):
            status, _, _ = await fleet.chat("alpha")
            assert status == 200
        assert (await fleet.post("/v1/chat/completions", {**CHAT, "model": 7}))[0] == 400
        traffic = await until(
            lambda k, d: k == "traffic" and d["models"].get("alpha", {}).get("requests") == 3,
            "the traffic of three requests",
        )
        alpha = traffic["models"]["alpha"]
        assert alpha["errors"] == 0 and alpha["p50"] > 0 and alpha["ttft_p50"] > 0
        assert sum(point["requests"] for point in alpha["series"]) == 3

        await node.stop_agent()
        await until(lambda k, d: k == "fleet" and not d["instances"], "the instance to leave")


async def test_traffic_view_answers_once(fleet: Fleet) -> None:
    assert fleet.http is not None
    await fleet.add_fake(model="alpha", slots=1)
    await fleet.chat("alpha")
    async with fleet.http.get(fleet.management + "/api/v1/traffic", headers=AUTH) as response:
        data = await response.json()
    assert data["models"]["alpha"]["requests"] == 1
    assert data["window_seconds"] == 300 and data["bucket_seconds"] == 10
