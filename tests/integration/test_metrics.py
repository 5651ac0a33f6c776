"""``/metrics`` and the access log against a known workload: exact counts, and the
metric families exposed are exactly those ``docs/metrics.md`` documents."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.metrics_docs import documented_metrics
from tests.support.fleet import CHAT, MANAGEMENT_TOKEN, Fleet, start_fleet
from tests.support.local_serve import complete, pid_of, serving
from tests.support.waiting import wait_for

CHAT_ROUTE = "/v1/chat/completions"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(policy="prefix", max_buffered_requests=1)
    try:
        yield fleet
    finally:
        await fleet.close()


async def scrape_text(management: str, token: str = MANAGEMENT_TOKEN) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(management + "/metrics", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        assert response.status == 200
        return await response.text()


def samples_of(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every labelled value of one sample name."""
    return {labels: value for (n, labels), value in samples.items() if n == name}


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def exposed_name(family_name: str, kind: str) -> str:
    """The name people query: counters carry ``_total``."""
    return family_name + "_total" if kind == "counter" else family_name


def usage_of_stream(body: str) -> dict[str, int]:
    """prompt/cached/generated tokens from the last event of a stream that has them."""
    for line in reversed(body.splitlines()):
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        if "usage" in event:
            usage = event["usage"]
            return {
                "prompt": usage["prompt_tokens"],
                "cached": usage["prompt_tokens_details"]["cached_tokens"],
                "generated": usage["completion_tokens"],
            }
        if "timings" in event:
            timings = event["timings"]
            return {
                "prompt": timings["prompt_n"] + timings["cache_n"],
                "cached": timings["cache_n"],
                "generated": timings["predicted_n"],
            }
    raise AssertionError(f"no usage in stream: {body[-300:]}")


async def test_metrics_count_a_known_workload_exactly(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=2)
    await fleet.add_fake(model="s", slots=1, token_delay=0.1, tokens=10)
    assert fleet.http is not None
    instance_m = fleet.balancer.scheduler.fleet.pool("m")[0].id
    totals = {"prompt": 0, "cached": 0, "generated": 0}

    # 3 plain chat completions (the same prompt: the later ones hit the slot cache)
    for _ in range(3):
        status, body, _ = await fleet.chat("m")
        assert status == 200, body
        totals["prompt"] += body["usage"]["prompt_tokens"]
        totals["cached"] += body["usage"]["prompt_tokens_details"]["cached_tokens"]
        totals["generated"] += body["usage"]["completion_tokens"]
    # 2 streamed ones: usage in its own chunk, and only timings in the last one
    for stream_options in ({"include_usage": True}, None):
        request: dict[str, Any] = {**CHAT, "model": "m", "stream": True}
        if stream_options:
            request["stream_options"] = stream_options
        async with fleet.http.post(fleet.base + CHAT_ROUTE, json=request) as response:
            assert response.status == 200
            usage = usage_of_stream((await response.read()).decode())
        for key in totals:
            totals[key] += usage[key]
    # 2 requests for a model nobody serves
    for _ in range(2):
        assert (await fleet.chat("nope"))[0] == 404
    # "s" has one slot and room for one buffered request: the third is refused
    first = asyncio.create_task(fleet.chat("s"))
    await wait_for(lambda: fleet.balancer.scheduler.fleet.pool("s")[0].in_flight == 1, "s busy")
    second = asyncio.create_task(fleet.chat("s"))
    await wait_for(lambda: fleet.balancer.scheduler.buffered("s") == 1, "one buffered for s")
    assert (await fleet.chat("s"))[0] == 429
    assert (await first)[0] == 200
    assert (await second)[0] == 200

    samples = samples_of(await scrape_text(fleet.management))
    chat = CHAT_ROUTE
    answered = {
        labels(model="m", route=chat, status="200"): 5.0,
        labels(model="", route=chat, status="404"): 2.0,  # not the made-up names
        labels(model="s", route=chat, status="200"): 2.0,
        labels(model="s", route=chat, status="429"): 1.0,
    }
    assert series(samples, "corral_responses_total") == answered
    assert series(samples, "corral_request_duration_seconds_count") == answered
    # a first token exists only for responses relayed from an instance
    relayed = {k: v for k, v in answered.items() if ("status", "200") in k}
    assert series(samples, "corral_time_to_first_token_seconds_count") == relayed
    assert series(samples, "corral_buffer_wait_seconds_count") == {labels(model="s"): 1.0}
    tokens = series(samples, "corral_generated_tokens_total")
    assert tokens[labels(model="m", instance=instance_m)] == totals["generated"]
    assert totals["generated"] == 5 * 8  # the fake's default length: the sum is not vacuous
    prompt = series(samples, "corral_prompt_tokens_total")
    assert prompt[labels(model="m", instance=instance_m, cache="cached")] == totals["cached"]
    assert prompt[labels(model="m", instance=instance_m, cache="uncached")] == (
        totals["prompt"] - totals["cached"]
    )
    assert totals["cached"] > 0  # repeats were served from the cache
    # the prefix policy placed the 7 requests that got a slot
    decisions = series(samples, "corral_placement_decisions_total")
    assert sum(decisions.values()) == 7
    assert series(samples, "corral_upstream_retries_total") == {}
    assert samples[("corral_slots_total", labels(instance=instance_m, model="m"))] == 2


async def test_every_exposed_metric_is_documented_and_every_documented_one_exposed(
    fleet: Fleet,
) -> None:
    await fleet.add_fake(model="m", slots=1)
    assert (await fleet.chat("m"))[0] == 200
    text = await scrape_text(fleet.management)
    exposed = {
        exposed_name(f.name, f.type): f.type
        for f in text_string_to_metric_families(text)
        # prometheus_client's ``_created`` timestamps parse as families of their own
        if f.name.startswith("corral_") and not f.name.endswith("_created")
    }
    docs = documented_metrics()
    assert set(exposed) - set(docs) == set(), "exposed but not in docs/metrics.md"
    assert set(docs) - set(exposed) == set(), "in docs/metrics.md but not exposed"
    assert exposed == docs, "docs/metrics.md names a wrong type"


async def test_metrics_need_the_management_token(fleet: Fleet) -> None:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(fleet.management + "/metrics") as response,
    ):
        assert response.status == 401


async def test_access_log_has_one_key_value_line_per_request(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.access")
    await fleet.add_fake(model="m", slots=1)
    await fleet.add_fake(model="other", slots=1)  # with one model any name would reach it
    instance = fleet.balancer.scheduler.fleet.pool("m")[0].id
    status, body, headers = await fleet.chat("m")
    assert status == 200
    assert (await fleet.chat('evil" status=200\nrequest_id=forged'))[0] == 404

    lines = [r.getMessage() for r in caplog.records if r.name == "corral.access"]
    assert len(lines) == 2
    ok = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', lines[0]))
    assert ok["request_id"] == headers["X-Request-Id"]
    assert ok["model"] == "m"
    assert ok["instance"] == instance
    assert ok["status"] == "200"
    assert ok["route"] == CHAT_ROUTE
    assert float(ok["buffer_wait"]) == 0.0
    assert 0 < float(ok["ttft"]) <= float(ok["duration"])
    assert int(ok["prompt_tokens"]) == body["usage"]["prompt_tokens"]
    assert int(ok["cached_tokens"]) == body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert int(ok["generated_tokens"]) == body["usage"]["completion_tokens"]

    refused = lines[1]
    assert "\n" not in refused  # a hostile model name cannot start a forged line
    fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', refused))
    assert fields["model"] == "-"  # the name resolved to nothing; logged as asked
    assert json.loads(fields["asked"]) == 'evil" status=200\nrequest_id=forged'
    assert fields["status"] == "404"
    assert fields["instance"] == "-" and fields["ttft"] == "-"
    assert fields["generated_tokens"] == "-"


async def test_supervised_starts_restarts_failures_and_swaps_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models: dict[str, dict[str, Any]] = {"a": {}, "b": {}}
    async with serving(tmp_path, monkeypatch, models, max_instances=1) as (local, base, http):
        management = f"http://{local.balancer.addresses.management}"

        async def scraped() -> Samples:
            return samples_of(await scrape_text(management, "models-token"))

        assert (await complete(http, base, "a"))[0] == 200
        os.kill(pid_of(local, "a") or 0, signal.SIGKILL)  # a crash: the supervisor restarts it

        async def restarted() -> bool:
            samples = await scraped()
            return samples.get(("corral_instance_startup_seconds_count", labels(model="a"))) == 2

        await wait_for(restarted, "a's restart to be counted")
        assert (await complete(http, base, "b"))[0] == 200  # evicts a (max_instances 1)
        await wait_for(
            lambda: local.host is not None and local.host.running["b"].state == "loaded",
            "b to be noted loaded",
        )

        async def b_reported() -> bool:  # the counters travel in the next agent snapshot
            samples = await scraped()
            return samples.get(("corral_instance_startup_seconds_count", labels(model="b"))) == 1

        await wait_for(b_reported, "b's start to reach the balancer")
        samples = await scraped()
        assert series(samples, "corral_instance_starts_total") == {
            labels(model="a"): 2.0,
            labels(model="b"): 1.0,
        }
        assert series(samples, "corral_instance_restarts_total") == {labels(model="a"): 1.0}
        assert series(samples, "corral_instance_failures_total") == {labels(model="a"): 1.0}
        assert series(samples, "corral_instance_startup_seconds_count") == {
            labels(model="a"): 2.0,
            labels(model="b"): 1.0,
        }
        # one load each: a's restart was the supervisor's, not a swap
        assert series(samples, "corral_model_swap_seconds_count") == {
            labels(model="a"): 1.0,
            labels(model="b"): 1.0,
        }
        swap_b = samples[("corral_model_swap_seconds_sum", labels(model="b"))]
        startup_b = samples[("corral_instance_startup_seconds_sum", labels(model="b"))]
        assert swap_b >= startup_b  # the swap holds the start (and a's eviction)


async def test_autoscaling_endpoint_and_gauge_follow_busy_slots_and_buffer(fleet: Fleet) -> None:
    import aiohttp

    await fleet.add_fake(model="s", slots=1, token_delay=0.1, tokens=20)
    running = asyncio.create_task(fleet.chat("s"))
    await wait_for(lambda: fleet.balancer.scheduler.fleet.pool("s")[0].in_flight == 1, "s busy")
    waiting = asyncio.create_task(fleet.chat("s"))
    await wait_for(lambda: fleet.balancer.scheduler.buffered("s") == 1, "one buffered for s")
    headers = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    url = fleet.management + "/api/v1/autoscaling"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(url) as response:
            assert response.status == 200
            body = await response.json()
        async with http.get(url, params={"model": "s", "target": "0.5"}) as response:
            one = await response.json()
        for bad in ("0", "1.5", "lots"):
            async with http.get(url, params={"target": bad}) as response:
                assert response.status == 400
                assert "target" in (await response.json())["error"]["message"]
    gauge = series(
        samples_of(await scrape_text(fleet.management)), "corral_autoscaling_wanted_instances"
    )
    assert (await running)[0] == 200 and (await waiting)[0] == 200

    s = body["models"]["s"]
    assert {k: s[k] for k in ("instances", "slots_total", "slots_busy", "buffered")} == {
        "instances": 1,
        "slots_total": 1,
        "slots_busy": 1,
        "buffered": 1,
    }
    assert s["wanted_instances"] == 3  # ceil((1 busy + 1 buffered) / (1 slot * 0.8))
    assert body["target_utilization"] == 0.8 and body["wanted_instances"] == 3
    assert one["model"] == "s" and one["wanted_instances"] == 4  # ceil(2 / 0.5)
    assert gauge == {labels(model="s"): 3.0}
