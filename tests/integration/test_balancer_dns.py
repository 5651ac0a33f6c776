"""Balancers found by name: an agent given ``NAME:PORT`` reports to every address of
the name (a Kubernetes headless Service gives one per balancer pod), connects to those
that appear and leaves those that go, without a restart. The test's own resolver stands
for DNS; the balancers are real, on three loopback addresses and one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from aiohttp.test_utils import TestServer

from corral.agent import Agent, resolve_balancers
from corral.testing.fake_llama_server import FakeOptions, build_app
from tests.support.fleet import Fleet, start_fleet, watching
from tests.support.net import free_port
from tests.support.waiting import wait_for

NAME = "balancers.corral.test"


async def test_an_agent_follows_the_addresses_of_its_balancers_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral.agent")
    port = free_port()
    fleets: dict[str, Fleet] = {}
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        fleets[ip] = await start_fleet(management_addr=f"{ip}:{port}", inference_addr=f"{ip}:0")
    answers: list[str] = ["127.0.0.1", "127.0.0.2"]
    looked_up: list[tuple[str, int]] = []

    async def resolve(host: str, asked_port: int) -> list[str]:
        looked_up.append((host, asked_port))
        return list(answers)

    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server()
    agent = Agent(watching(server, [f"{NAME}:{port}"], balancer_dns_interval=0.1, resolve=resolve))
    task = asyncio.create_task(agent.run())

    def reported(ip: str) -> bool:
        return bool(fleets[ip].balancer.scheduler.fleet.pool("m"))

    try:
        await wait_for(lambda: reported("127.0.0.1") and reported("127.0.0.2"), "both balancers")
        assert looked_up[0] == (NAME, port)
        assert not reported("127.0.0.3")
        # a third balancer appears behind the name, and the first goes
        answers[:] = ["127.0.0.2", "127.0.0.3"]
        await wait_for(lambda: reported("127.0.0.3"), "the balancer that appeared")
        await wait_for(lambda: not reported("127.0.0.1"), "the one that went to forget it")
        assert reported("127.0.0.2")
        assert sorted(link.socket_url for link in agent.links) == [
            f"ws://127.0.0.2:{port}/api/v1/agents/socket",
            f"ws://127.0.0.3:{port}/api/v1/agents/socket",
        ]
        # a lookup that finds nothing (DNS down) keeps the balancers it has
        answers[:] = []
        calls = len(looked_up)
        await wait_for(lambda: len(looked_up) >= calls + 2, "two more lookups")
        assert reported("127.0.0.2") and reported("127.0.0.3")
        assert "balancer address gone" in caplog.text and "127.0.0.1" in caplog.text
    finally:
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close()
        for fleet in fleets.values():
            await fleet.close()


async def test_the_system_resolver_gives_one_family_so_no_balancer_counts_twice() -> None:
    # localhost has 127.0.0.1 and often ::1: the same balancer, reached twice
    assert await resolve_balancers("localhost", 9091) == ["127.0.0.1"]
