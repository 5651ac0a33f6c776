"""The balancer, agents and fake llama-servers as separate processes, as deployed.

Each part is started with its own command line (``corral balancer``, ``corral agent``,
``python -m corral.testing.fake_llama_server``) and talks real HTTP and WebSocket over
loopback; failures are real process deaths (SIGKILL).
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.support.fleet import CHAT
from tests.support.processes import (
    START_S,
    BalancerProc,
    Processes,
    fleet_of,
    ready_count,
)
from tests.support.waiting import wait_for


async def chat(
    http: aiohttp.ClientSession, balancer: BalancerProc, model: str = "m"
) -> tuple[int, dict[str, Any], str]:
    async with http.post(
        f"http://{balancer.inference}/v1/chat/completions", json={**CHAT, "model": model}
    ) as response:
        body = await response.json(content_type=None)
        return response.status, body, response.headers.get("X-Corral-Instance", "")


async def fake_state(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/_fake/state") as response:
        data: dict[str, Any] = await response.json()
        return data


async def test_requests_spread_evenly_over_idle_instances(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer()
    urls = [await procs.fake("--model", "m", "--slots", "2") for _ in range(3)]
    for url in urls:
        await procs.agent(url, balancer.management)
    await wait_for(ready_count(balancer, http)(3), "three usable instances")
    results = [await chat(http, balancer) for _ in range(30)]
    assert [status for status, _, _ in results] == [200] * 30
    served = [(await fake_state(http, url))["requests_served"] for url in urls]
    assert sum(served) == 30
    assert min(served) >= 8, served  # idle instances take turns (10 each when exact)


async def test_agent_that_dies_leaves_the_pool_and_buffered_requests_go_elsewhere(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "30")
    slow = ["--model", "m", "--slots", "1", "--token-delay", "0.1", "--tokens", "10"]
    doomed_url, other_url = await procs.fake(*slow), await procs.fake(*slow)
    doomed_agent = await procs.agent(doomed_url, balancer.management)
    await wait_for(ready_count(balancer, http)(1), "the first instance")
    await procs.agent(other_url, balancer.management)
    await wait_for(ready_count(balancer, http)(2), "both instances")
    requests = [asyncio.create_task(chat(http, balancer)) for _ in range(6)]

    async def two_in_flight() -> bool:
        fleet = await fleet_of(http, balancer)
        return sum(i["in_flight"] for i in fleet["instances"]) == 2

    await wait_for(two_in_flight, "both slots taken")
    doomed_agent.process.send_signal(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await wait_for(ready_count(balancer, http)(1), "the dead agent's instance to leave")
    assert loop.time() - killed_at < 3.0
    results = await asyncio.gather(*requests)
    assert [status for status, _, _ in results] == [200] * 6
    doomed = await fake_state(http, doomed_url)
    other = await fake_state(http, other_url)
    assert doomed["requests_served"] == 1  # only the request already running there
    assert other["requests_served"] == 5


async def test_agent_without_the_cluster_token_is_refused_and_gets_no_traffic(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "0.5")
    rogue_url = await procs.fake("--model", "rogue", "--slots", "4")
    rogue = await procs.agent(rogue_url, balancer.management, token="not-the-token")
    await procs._line(rogue, r"cluster token", source="log")
    fleet = await fleet_of(http, balancer)
    assert fleet["agents"] == [] and fleet["instances"] == []
    status, body, _ = await chat(http, balancer, "rogue")
    assert status == 504, body
    state = await fake_state(http, rogue_url)
    assert state["requests_served"] == state["requests_failed"] == state["max_in_flight"] == 0
    assert "not-the-token" not in rogue.log()


def all_idle(balancer: BalancerProc, http: aiohttp.ClientSession) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        fleet = await fleet_of(http, balancer)
        return all(i["slots_free"] == i["slots_total"] for i in fleet["instances"])

    return condition


async def test_two_balancers_over_the_same_agents_each_serve_alone(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    first, second = await procs.balancer(), await procs.balancer()
    urls = [await procs.fake("--model", "m", "--slots", "2") for _ in range(2)]
    for url in urls:
        await procs.agent(url, first.management, second.management)
    for balancer in (first, second):
        await wait_for(ready_count(balancer, http)(2), "both instances on each balancer")
    for balancer in (first, second):
        # Agents report slot use late: wait until this balancer's picture shows the
        # other balancer's last requests finished, or an instance still busy there
        # rightly gets none of this round.
        await wait_for(all_idle(balancer, http), "every slot idle on this balancer")
        results = [await chat(http, balancer) for _ in range(4)]
        assert [status for status, _, _ in results] == [200] * 4
        assert len({instance for _, _, instance in results}) == 2
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    results = [await chat(http, second) for _ in range(4)]
    assert collections.Counter(status for status, _, _ in results) == {200: 4}


async def test_balancer_sigterm_exits_zero_after_in_flight_requests_finish(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer()
    url = await procs.fake("--model", "m", "--slots", "1", "--token-delay", "0.1", "--tokens", "8")
    await procs.agent(url, balancer.management)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    running = asyncio.create_task(chat(http, balancer))

    async def in_flight() -> bool:
        return (await fake_state(http, url))["in_flight"] == 1

    await wait_for(in_flight, "the request to start")
    balancer.process.send_signal(signal.SIGTERM)
    status, body, _ = await running
    assert status == 200, body
    assert await asyncio.wait_for(balancer.process.wait(), START_S) == 0
