"""A small fleet for integration tests: a real balancer, real agents, fake llama-servers.

Everything runs on the test's event loop but talks real HTTP and WebSocket over
loopback: the balancer listens on free ports, each fake llama-server is an aiohttp
server, and each agent polls its fake and reports to the balancer like a remote one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from corral.agent import Agent, AgentOptions
from corral.balancer import Balancer
from corral.config import load_settings
from corral.protocol import InstanceReport
from corral.testing.fake_llama_server import SERVER_KEY, FakeLlamaServer, FakeOptions, build_app
from tests.support.waiting import wait_for

MANAGEMENT_TOKEN = "test-management-token"
CLUSTER_TOKEN = "test-cluster-token"
CHAT = {"messages": [{"role": "user", "content": "hello there my friend"}]}


def watching(server: TestServer, balancers: list[str], **options: Any) -> AgentOptions:
    """A test agent's options: it watches ``server`` and reports to ``balancers``,
    polling and reconnecting quickly; ``options`` are more :class:`AgentOptions`."""
    return AgentOptions(
        **{
            "local_llama_server": str(server.make_url("")).rstrip("/"),
            "balancers": balancers,
            "cluster_token": CLUSTER_TOKEN,
            "poll_interval": 0.05,
            "backoff_initial": 0.05,
            **options,
        }
    )


@dataclass
class FakeNode:
    server: TestServer
    agent: Agent
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def fake(self) -> FakeLlamaServer:
        return self.server.app[SERVER_KEY]

    async def stop_agent(self) -> None:
        await self.agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@dataclass
class Fleet:
    balancer: Balancer
    nodes: list[FakeNode] = field(default_factory=list)
    unwatched: list[TestServer] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        return f"http://{self.balancer.addresses.inference}"

    @property
    def management(self) -> str:
        return f"http://{self.balancer.addresses.management}"

    def usable(self) -> int:
        now = self.balancer.scheduler.clock()
        return sum(1 for i in self.balancer.scheduler.fleet.instances.values() if i.usable(now))

    async def add_fake(
        self, *, wait: bool = True, agent_key: str | None = None, **options: Any
    ) -> FakeNode:
        """A fake llama-server (``options``: :class:`FakeOptions`) and an agent reporting
        it, with ``agent_key`` as its llama-server API key."""
        server = TestServer(build_app(FakeOptions(**options)))
        await server.start_server()
        agent = Agent(
            watching(server, [self.balancer.addresses.management], llama_server_api_key=agent_key)
        )
        node = FakeNode(server, agent, asyncio.create_task(agent.run()))
        self.nodes.append(node)
        if wait:
            expected = self.usable() + 1
            await wait_for(lambda: self.usable() >= expected, "the new instance to be usable")
        return node

    async def add_unwatched_fake(self, model: str, slots: int, **options: Any) -> TestServer:
        """A fake registered once by hand, with no agent behind it: the balancer trusts
        that one report until the report timeout, as with a fault no agent saw yet."""
        server = TestServer(build_app(FakeOptions(model=model, slots=slots, **options)))
        await server.start_server()
        scheduler = self.balancer.scheduler
        agent_id = f"manual-{len(scheduler.fleet.agents)}"
        scheduler.register_agent(agent_id, agent_id)
        url = str(server.make_url("")).rstrip("/")
        instance = {
            "id": "0",
            "url": url,
            "model": model,
            "state": "ready",
            "total_slots": slots,
            "busy": 0,
            "n_ctx": 4096,
            "issues": [],
        }
        assert scheduler.apply_snapshot(agent_id, 1, [InstanceReport.from_wire(instance)])
        self.unwatched.append(server)
        return server

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        assert self.http is not None
        async with self.http.post(self.base + path, json=body, headers=headers) as response:
            raw = await response.read()
            try:
                data: Any = await response.json(content_type=None)
            except ValueError:
                data = raw
            return response.status, data, response.headers

    async def chat(self, model: str | None = None, **extra: Any) -> tuple[int, Any, Any]:
        body: dict[str, Any] = {**CHAT, **extra}
        if model is not None:
            body["model"] = model
        return await self.post("/v1/chat/completions", body)

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop_agent()
        await self.balancer.stop()
        for node in self.nodes:
            await node.server.close()
        for server in self.unwatched:
            await server.close()
        if self.http is not None:
            await self.http.close()


async def start_fleet(**settings: Any) -> Fleet:
    values: dict[str, Any] = {
        "inference_addr": "127.0.0.1:0",
        "management_addr": "127.0.0.1:0",
        "shutdown_timeout": 5.0,
        **settings,
    }
    balancer = Balancer(
        load_settings(environ={}, overrides=values),
        management_token=MANAGEMENT_TOKEN,
        cluster_token=CLUSTER_TOKEN,
    )
    await balancer.start()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    return Fleet(balancer=balancer, http=http)
