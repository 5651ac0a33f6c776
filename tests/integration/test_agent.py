"""The agent watches an external llama-server and keeps real balancers informed.

Each test runs, in-process on one event loop, real balancer management apps (the
:class:`~corral.control.management.Management` app over a real
:class:`~corral.scheduling.scheduler.Scheduler`), fake llama-servers (or a scripted
one where a fault the fake lacks is needed) and an :class:`~corral.agent.Agent`,
then reads the balancer's fleet. Nothing sleeps a fixed time: every wait is on a
condition with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from corral.agent import (
    AWS_LOCAL_IPV4_HOST,
    Agent,
    AgentOptions,
    MetadataError,
    resolve_external_url,
)
from corral.control.management import AGENT_SOCKET_PATH, Management
from corral.fleet.state import Instance
from corral.observe.metrics import BalancerMetrics
from corral.scheduling.policies import LeastBusy
from corral.scheduling.scheduler import Scheduler
from corral.testing.fake_llama_server import SERVER_KEY, FakeLlamaServer, FakeOptions, build_app
from tests.support.waiting import wait_for

WAIT_S = 10.0
CLUSTER_TOKEN = "cluster-secret-0123456789"
MANAGEMENT_TOKEN = "management-secret-0123456789"
LLAMA_API_KEY = "llama-key-0123456789"


async def eventually(condition: Callable[[], bool], what: str, limit_s: float = WAIT_S) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``limit_s``."""
    await wait_for(condition, f"until {what}", limit_s)


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# ------------------------------------------------------------------ balancers
@dataclass
class Balancer:
    scheduler: Scheduler
    management: Management
    server: TestServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def instance(self, agent: Agent) -> Instance | None:
        return self.scheduler.fleet.instances.get(f"{agent.agent_id}/{agent.instance_id}")

    def usable(self, agent: Agent) -> bool:
        instance = self.instance(agent)
        return instance is not None and instance.usable(time.monotonic())

    def issue_kinds(self, agent: Agent) -> set[str]:
        instance = self.instance(agent)
        return {i.kind for i in instance.issues} if instance is not None else set()


@pytest.fixture
async def make_balancer() -> AsyncIterator[Callable[..., Awaitable[Balancer]]]:
    servers: list[TestServer] = []

    async def make(port: int | None = None) -> Balancer:
        scheduler = Scheduler(LeastBusy())
        management = Management(
            scheduler,
            BalancerMetrics(scheduler),
            management_token=MANAGEMENT_TOKEN,
            cluster_token=CLUSTER_TOKEN,
        )
        server = TestServer(management.app, host="127.0.0.1", port=port)
        await server.start_server()
        servers.append(server)
        return Balancer(scheduler, management, server)

    yield make
    for server in servers:
        await server.close()


# -------------------------------------------------------------- llama-servers
@pytest.fixture
async def make_fake() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """In-process fake llama-servers on loopback, closed at the end."""
    servers: list[TestServer] = []

    async def make(**options: Any) -> TestServer:
        server = TestServer(build_app(FakeOptions(**options)), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


def fake_of(server: TestServer) -> FakeLlamaServer:
    return server.app[SERVER_KEY]


HEALTHY_PROPS: dict[str, Any] = {
    "default_generation_settings": {"params": {}, "n_ctx": 2048},
    "total_slots": 2,
    "model_alias": "scripted.gguf",
    "model_path": "/models/scripted.gguf",
}
HEALTHY_SLOTS = [{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}]


@dataclass
class ScriptedLlama:
    """A llama-server stand-in whose answer to each GET path a test sets."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heal()

    def heal(self) -> None:
        self.answers = {
            "/health": (200, json.dumps({"status": "ok"}).encode()),
            "/props": (200, json.dumps(HEALTHY_PROPS).encode()),
            "/slots": (200, json.dumps(HEALTHY_SLOTS).encode()),
        }

    def set(self, path: str, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, raw)

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            status, body = self.answers.get(request.path, (404, b'{"error": {}}'))
            return web.Response(status=status, body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/{tail:.*}", answer)
        return app


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedLlama, str]]:
    llama = ScriptedLlama()
    server = TestServer(llama.app(), host="127.0.0.1")
    await server.start_server()
    yield llama, url_of(server)
    await server.close()


# --------------------------------------------------------------------- agents
class Agents:
    """Starts agents as tasks; stops every one at the end of the test."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.agents: list[Agent] = []

    def start(self, llama_url: str, balancers: list[Balancer], **options: Any) -> Agent:
        options.setdefault("cluster_token", CLUSTER_TOKEN)
        options.setdefault("poll_interval", 0.05)
        options.setdefault("name", "test-agent")
        agent = Agent(
            AgentOptions(
                local_llama_server=llama_url,
                balancers=[b.address for b in balancers],
                **options,
            )
        )
        self.agents.append(agent)
        self.tasks[agent.agent_id] = asyncio.create_task(agent.run())
        return agent

    def task(self, agent: Agent) -> asyncio.Task[None]:
        return self.tasks[agent.agent_id]

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, WAIT_S)


@pytest.fixture
async def agents() -> AsyncIterator[Agents]:
    started = Agents()
    yield started
    await started.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def ready_instance(balancer: Balancer, agent: Agent) -> Instance:
    await eventually(lambda: balancer.usable(agent), "the instance is usable on the balancer")
    instance = balancer.instance(agent)
    assert instance is not None
    return instance


# ======================================================================= fleet
async def test_agent_reports_model_slots_and_context_of_its_llama_server(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake(slots=3, ctx_size=3000, model="tiny-chat")
    agent = agents.start(url_of(fake), [balancer])

    instance = await ready_instance(balancer, agent)

    assert instance.model == "tiny-chat"
    assert instance.url == url_of(fake)
    assert instance.total_slots == 3
    assert instance.n_ctx == 1000
    assert instance.reported_busy == 0
    assert instance.issues == []
    assert balancer.scheduler.fleet.agents[agent.agent_id].name == "test-agent"
    assert balancer.scheduler.fleet.served_models() == ["tiny-chat"]


async def test_agent_reports_busy_slots_while_a_stream_runs_and_frees_them_after(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
    http: aiohttp.ClientSession,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake(slots=2, tokens=100_000, token_delay=0.01)
    agent = agents.start(url_of(fake), [balancer])
    instance = await ready_instance(balancer, agent)
    assert instance.reported_busy == 0

    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with http.post(url_of(fake) + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        await response.content.readline()  # the stream has started: a slot is busy
        await eventually(
            lambda: instance.reported_busy == 1, "the balancer sees one busy slot of two"
        )
        assert instance.free_slots == 1
        response.close()  # the client leaves; the fake frees the slot
    await eventually(lambda: instance.reported_busy == 0, "the balancer sees the slot freed")
    assert instance.free_slots == 2


async def test_agent_keeps_reporting_while_nothing_changes(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake()
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)
    record = balancer.scheduler.fleet.agents[agent.agent_id]
    seen = record.last_seq

    await eventually(lambda: record.last_seq >= seen + 2, "two more snapshots arrived")
    assert balancer.usable(agent)


async def test_two_balancers_both_receive_snapshots(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
    http: aiohttp.ClientSession,
) -> None:
    first, second = await make_balancer(), await make_balancer()
    fake = await make_fake(slots=2, tokens=100_000, token_delay=0.01)
    agent = agents.start(url_of(fake), [first, second])
    instances = [await ready_instance(first, agent), await ready_instance(second, agent)]

    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with http.post(url_of(fake) + "/v1/chat/completions", json=body) as response:
        await response.content.readline()
        await eventually(
            lambda: all(i.reported_busy == 1 for i in instances), "both see the busy slot"
        )
        response.close()
    assert all(link.connected for link in agent.links)
    assert all(link.snapshots_sent > 0 for link in agent.links)


# ================================================================== lifecycle
async def test_stopping_the_agent_deregisters_it_and_removes_its_instance(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake()
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)

    await agent.stop()
    await asyncio.wait_for(agents.task(agent), WAIT_S)

    assert balancer.scheduler.fleet.instances == {}
    assert agent.agent_id not in balancer.scheduler.fleet.agents
    assert balancer.management.agent_sockets == {}


async def test_cancelling_the_agent_still_deregisters_it(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake()
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)

    task = agents.task(agent)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)

    await eventually(
        lambda: balancer.scheduler.fleet.instances == {}, "the instance left the fleet"
    )


async def test_agent_reconnects_after_the_balancer_drops_its_connection(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake()
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)
    link = agent.links[0]
    assert link.connects == 1

    await balancer.management.agent_sockets[agent.agent_id].close()

    await eventually(lambda: link.connects == 2, "the agent connected again")
    await ready_instance(balancer, agent)
    assert not agents.task(agent).done()


async def test_agent_reconnects_to_a_restarted_balancer(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    port = balancer.server.port
    fake = await make_fake()
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)
    link = agent.links[0]

    await balancer.server.close()
    await eventually(lambda: not link.connected, "the agent noticed the balancer is gone")
    await eventually(lambda: link.failures >= 1, "a reconnect attempt failed")

    restarted = await make_balancer(port=port)
    await ready_instance(restarted, agent)
    assert link.connects == 2


async def test_agent_with_a_wrong_cluster_token_is_refused_and_never_registers(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    balancer = await make_balancer()
    fake = await make_fake()
    wrong = "not-the-cluster-token-42"
    agent = agents.start(url_of(fake), [balancer], cluster_token=wrong)
    link = agent.links[0]

    # retried (with backoff), never fatal
    await eventually(lambda: link.refusals >= 3, "the agent was refused three times")
    assert not agents.task(agent).done()
    assert link.connects == 0
    assert "401" in link.last_error
    assert balancer.scheduler.fleet.agents == {}
    assert balancer.scheduler.fleet.instances == {}
    assert "refused the cluster token" in caplog.text
    assert wrong not in caplog.text
    # the balancer answers 401 before any upgrade
    async with http.get(
        f"http://{balancer.address}{AGENT_SOCKET_PATH}",
        headers={"Authorization": f"Bearer {wrong}", "Upgrade": "websocket"},
    ) as response:
        assert response.status == 401


# ============================================================== llama issues
async def test_refused_connection_to_llama_server_is_an_unreachable_issue(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake(model="watched")
    agent = agents.start(url_of(fake), [balancer])
    await ready_instance(balancer, agent)

    await fake.close()  # the port now refuses connections

    await eventually(
        lambda: "unreachable" in balancer.issue_kinds(agent), "an unreachable issue appears"
    )
    instance = balancer.instance(agent)
    assert instance is not None
    assert instance.state.value == "failed"
    assert instance.model == "watched"  # still in its pool, set aside
    assert not balancer.usable(agent)


async def test_llama_server_api_key_is_sent_and_a_missing_one_is_unauthorized(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    balancer = await make_balancer()
    fake = await make_fake(api_keys=(LLAMA_API_KEY,))
    without_key = agents.start(url_of(fake), [balancer])
    with_key = agents.start(url_of(fake), [balancer], llama_server_api_key=LLAMA_API_KEY)

    await ready_instance(balancer, with_key)
    await eventually(
        lambda: balancer.issue_kinds(without_key) == {"unauthorized"},
        "the agent without the key reports an unauthorized issue",
    )
    assert not balancer.usable(without_key)
    assert LLAMA_API_KEY not in caplog.text
    assert CLUSTER_TOKEN not in caplog.text


async def test_llama_server_500_is_a_server_error_until_it_clears(
    make_balancer: Callable[..., Awaitable[Balancer]],
    scripted: tuple[ScriptedLlama, str],
    agents: Agents,
) -> None:
    llama, url = scripted
    balancer = await make_balancer()
    agent = agents.start(url, [balancer])
    instance = await ready_instance(balancer, agent)
    assert instance.model == "scripted"  # the file stem when no alias was given
    assert instance.aliases == ["scripted.gguf"]

    llama.set("/props", 500, {"error": {"code": 500, "message": "boom", "type": "server_error"}})
    await eventually(
        lambda: balancer.issue_kinds(agent) == {"server_error"}, "a server_error issue appears"
    )
    assert not balancer.usable(agent)
    assert "boom" in instance.issues[0].message

    llama.heal()
    await ready_instance(balancer, agent)


async def test_bad_json_from_llama_server_is_a_bad_response_issue(
    make_balancer: Callable[..., Awaitable[Balancer]],
    scripted: tuple[ScriptedLlama, str],
    agents: Agents,
) -> None:
    llama, url = scripted
    balancer = await make_balancer()
    agent = agents.start(url, [balancer])
    await ready_instance(balancer, agent)

    llama.set("/slots", 200, b"[{not json")
    await eventually(
        lambda: balancer.issue_kinds(agent) == {"bad_response"}, "a bad_response issue appears"
    )
    assert not balancer.usable(agent)


async def test_loading_llama_server_is_reported_starting_then_ready(
    make_balancer: Callable[..., Awaitable[Balancer]],
    scripted: tuple[ScriptedLlama, str],
    agents: Agents,
) -> None:
    llama, url = scripted
    loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    for path in ("/health", "/props", "/slots"):
        llama.set(path, 503, loading)
    balancer = await make_balancer()
    agent = agents.start(url, [balancer])

    await eventually(lambda: balancer.instance(agent) is not None, "the instance is reported")
    instance = balancer.instance(agent)
    assert instance is not None
    assert instance.state.value == "starting"
    assert balancer.issue_kinds(agent) == {"loading"}
    assert not balancer.usable(agent)

    llama.heal()
    ready = await ready_instance(balancer, agent)
    assert ready.state.value == "ready"


@pytest.mark.parametrize(("metrics", "source"), [(True, "metrics"), (False, "balancer")])
async def test_a_no_slots_server_is_usable_with_its_slot_source_named(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    agents: Agents,
    metrics: bool,
    source: str,
) -> None:
    balancer = await make_balancer()
    fake = await make_fake(slots_endpoint=False, metrics=metrics)
    agent = agents.start(url_of(fake), [balancer])

    await eventually(lambda: balancer.usable(agent), "the --no-slots instance to be usable")
    instance = await ready_instance(balancer, agent)
    assert instance.slot_source == source and balancer.issue_kinds(agent) == set()


# ==================================================================== protocol
@dataclass
class RecordingBalancer:
    """A balancer stand-in that records every frame an agent sends."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def socket(request: web.Request) -> web.WebSocketResponse:
            if request.headers.get("Authorization") != f"Bearer {CLUSTER_TOKEN}":
                raise web.HTTPUnauthorized()
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                self.messages.append(json.loads(message.data))
            self.closed.set()
            return ws

        app = web.Application()
        app.router.add_get(AGENT_SOCKET_PATH, socket)
        return app


async def test_agent_registers_first_numbers_snapshots_by_one_and_deregisters_last(
    make_fake: Callable[..., Awaitable[TestServer]], agents: Agents
) -> None:
    recorder = RecordingBalancer()
    server = TestServer(recorder.app(), host="127.0.0.1")
    await server.start_server()
    try:
        fake = await make_fake()
        agent = Agent(
            AgentOptions(
                local_llama_server=url_of(fake),
                balancers=[f"http://127.0.0.1:{server.port}"],
                cluster_token=CLUSTER_TOKEN,
                poll_interval=0.05,
            )
        )
        task = asyncio.create_task(agent.run())
        snapshots = lambda: [m for m in recorder.messages if m["type"] == "snapshot"]  # noqa: E731
        await eventually(lambda: len(snapshots()) >= 3, "three snapshots arrived")
        await agent.stop()
        await asyncio.wait_for(task, WAIT_S)
        await asyncio.wait_for(recorder.closed.wait(), WAIT_S)
    finally:
        await server.close()

    first, *middle, last = recorder.messages
    assert first == {
        "type": "register",
        "agent_id": agent.agent_id,
        "name": agent.options.name,
        "version": first["version"],
    }
    assert last == {"type": "deregister"}
    seqs = [m["seq"] for m in middle]
    assert all(m["type"] == "snapshot" for m in middle)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    (instance,) = middle[-1]["instances"]
    assert set(instance) == {
        "id", "url", "model", "aliases", "state", "total_slots", "busy", "n_ctx", "issues",
        "slot_source", "sleeping",
    }  # fmt: skip
    assert instance["id"] == "0"


# ============================================================ external address
@dataclass
class FakeImds:
    """An IMDSv2 stand-in: a session token from PUT is required to read local-ipv4."""

    address: str = "10.20.30.40"
    tokens: set[str] = field(default_factory=set)
    token_puts: int = 0

    def app(self) -> web.Application:
        async def put_token(request: web.Request) -> web.Response:
            ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return web.Response(status=400)
            token = uuid.uuid4().hex
            self.tokens.add(token)
            self.token_puts += 1
            return web.Response(text=token)

        async def local_ipv4(request: web.Request) -> web.Response:
            if request.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                return web.Response(status=401)
            return web.Response(text=self.address)

        app = web.Application()
        app.router.add_put("/latest/api/token", put_token)
        app.router.add_get("/latest/meta-data/local-ipv4", local_ipv4)
        return app


@pytest.fixture
async def imds() -> AsyncIterator[tuple[FakeImds, str]]:
    fake = FakeImds()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, url_of(server)
    await server.close()


async def test_fake_imds_rejects_a_get_without_a_session_token(
    imds: tuple[FakeImds, str], http: aiohttp.ClientSession
) -> None:
    _, base = imds
    async with http.get(base + "/latest/meta-data/local-ipv4") as response:
        assert response.status == 401


async def test_aws_metadata_host_is_resolved_through_imdsv2(imds: tuple[FakeImds, str]) -> None:
    fake, base = imds
    url = f"http://{AWS_LOCAL_IPV4_HOST}:8080"

    assert await resolve_external_url(url, metadata_base=base) == "http://10.20.30.40:8080"
    assert fake.token_puts == 1
    assert await resolve_external_url("http://10.0.0.1:80", metadata_base=base) == (
        "http://10.0.0.1:80"
    )
    assert fake.token_puts == 1  # no metadata call for an ordinary host


async def test_resolving_fails_clearly_when_the_metadata_answer_is_not_an_address(
    imds: tuple[FakeImds, str],
) -> None:
    fake, base = imds
    fake.address = "<html>captive portal</html>"
    with pytest.raises(MetadataError, match="not an IPv4 address"):
        await resolve_external_url(f"http://{AWS_LOCAL_IPV4_HOST}:8080", metadata_base=base)


async def test_agent_reports_the_metadata_resolved_external_url(
    make_balancer: Callable[..., Awaitable[Balancer]],
    make_fake: Callable[..., Awaitable[TestServer]],
    imds: tuple[FakeImds, str],
    agents: Agents,
) -> None:
    _, base = imds
    balancer = await make_balancer()
    fake = await make_fake()
    agent = agents.start(
        url_of(fake),
        [balancer],
        external_llama_server=f"http://{AWS_LOCAL_IPV4_HOST}:{fake.port}",
        metadata_base=base,
    )

    instance = await ready_instance(balancer, agent)
    assert instance.url == f"http://10.20.30.40:{fake.port}"
