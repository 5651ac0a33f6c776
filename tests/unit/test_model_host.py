"""The model host's effects over a real scheduler, with fake servers in place of
processes: what it starts, stops and refuses when requests come (its decisions are
the planner's, tested on their own in test_planner.py)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.catalog.catalog import Catalog
from corral.catalog.model import CatalogModel
from corral.config import ModelConfig, load_settings
from corral.hosting import ModelState
from corral.protocol import InstanceReport
from corral.scheduling.policies import LeastBusy, Placement
from corral.scheduling.scheduler import NoCapacity, Scheduler
from corral.supervisor.host import HostOptions, ModelHost
from corral.supervisor.managed import ManagedInstance
from corral.supervisor.process import PortLease
from tests.support.waiting import wait_for

_seq = itertools.count(1)


@dataclass
class FakeSupervisor:
    ready: bool = True
    last_error: str | None = None
    out_of_memory: object = None

    async def wait_ready(self) -> bool:
        await asyncio.sleep(0.01)  # a start takes a moment
        return self.ready


@dataclass
class FakeServer:
    """What a started llama-server and its agent do, as far as the host can see: the
    instance appears in the scheduler when started and leaves when stopped."""

    key: str
    url: str
    scheduler: Scheduler
    lease: PortLease
    supervisor: FakeSupervisor = field(default_factory=FakeSupervisor)
    started: bool = False
    stopped: bool = False
    scheme: str = "http"

    @property
    def agent_id(self) -> str:
        return f"agent-{self.key}-{self.url.rsplit(':', 1)[1]}"

    async def start(self) -> None:
        self.started = True
        if self.supervisor.ready:
            self.scheduler.register_agent(self.agent_id, self.agent_id)
            report = InstanceReport(id="0", url=self.url, model=self.key, total_slots=2)
            self.scheduler.apply_snapshot(self.agent_id, next(_seq), [report])

    async def stop(self) -> None:
        self.stopped = True
        self.scheduler.agent_gone(self.agent_id)
        self.lease.release()


class FakeHost(ModelHost):
    """The real host, starting fake servers; ``failing`` names models that never
    become ready."""

    def __init__(self, *args: Any, failing: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.servers: list[FakeServer] = []
        self.failing = failing or set()
        self.placed: dict[str, tuple[str, ...]] = {}
        """The devices each key was last started on."""

    def _managed(
        self,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        lease: PortLease,
        devices: tuple[str, ...] = (),
    ) -> ManagedInstance:
        self.placed[key] = devices
        server = FakeServer(key, f"http://127.0.0.1:{lease.port}", self.scheduler, lease)
        if model.id in self.failing:
            server.supervisor = FakeSupervisor(ready=False, last_error="exit 1; last log lines: x")
        self.servers.append(server)
        return server  # type: ignore[return-value]  # what the host uses of one

    def server(self, key: str) -> FakeServer:
        return next(s for s in reversed(self.servers) if s.key == key)


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


async def started_host(
    folder: Path,
    models: dict[str, dict[str, Any]],
    failing: tuple[str, ...] = (),
    **settings: Any,
) -> tuple[FakeHost, Scheduler]:
    table = {}
    for model_id, entry in models.items():
        path = folder / f"{model_id}.gguf"
        path.write_bytes(b"GGUF")
        table[model_id] = {"path": str(path), **entry}
    values = {"memory_check": False, "swap_hold": 0.0, "drain_timeout": 5.0, **settings}
    config = load_settings(environ={}, overrides=values)
    catalog = Catalog([], {i: ModelConfig.model_validate(e) for i, e in table.items()})
    scheduler = Scheduler(LeastBusy())
    host = FakeHost(
        config,
        catalog,
        scheduler,
        HostOptions(binary=folder / "llama-server", balancer="127.0.0.1:1", cluster_token="t"),
        failing=set(failing),
    )
    scheduler.loader = host
    scheduler.load_allowance = 10.0
    host.start()
    return host, scheduler


@pytest.fixture
async def hosts() -> AsyncIterator[list[FakeHost]]:
    made: list[FakeHost] = []
    yield made
    for host in made:
        await host.stop()


async def acquire(scheduler: Scheduler, model: str) -> Any:
    return await asyncio.wait_for(scheduler.acquire(model, Placement(model=model)), 10)


async def test_many_requests_for_a_model_start_it_once(
    models_dir: Path, hosts: list[FakeHost]
) -> None:
    host, scheduler = await started_host(models_dir, {"a": {}})
    hosts.append(host)
    leases = await asyncio.gather(*(acquire(scheduler, "a") for _ in range(2)))
    assert host.loads == 1
    assert host.state("a") is ModelState.LOADED
    for lease in leases:
        scheduler.release(lease)


async def test_at_max_instances_the_idle_model_is_stopped_for_the_next(
    models_dir: Path, hosts: list[FakeHost]
) -> None:
    host, scheduler = await started_host(models_dir, {"a": {}, "b": {}}, max_instances=1)
    hosts.append(host)
    events: list[tuple[str, str]] = []
    scheduler.listeners.append(
        lambda e: events.append((e["model"], e["event"])) if e.get("type") == "model" else None
    )
    scheduler.release(await acquire(scheduler, "a"))
    scheduler.release(await acquire(scheduler, "b"))
    assert host.server("a").stopped and not host.server("b").stopped
    assert (host.state("a"), host.state("b")) == (ModelState.UNLOADED, ModelState.LOADED)
    # b serves as soon as its agent reports it; the host notes it loaded a moment later
    await wait_for(lambda: ("b", "loaded") in events, "b noted loaded")
    assert events == [
        ("a", "loading"),
        ("a", "loaded"),
        ("a", "unloading"),
        ("a", "unloaded"),
        ("b", "loading"),
        ("b", "loaded"),
    ]


async def test_a_model_with_a_request_in_flight_is_stopped_only_once_it_is_done(
    models_dir: Path, hosts: list[FakeHost]
) -> None:
    host, scheduler = await started_host(models_dir, {"a": {}, "b": {}}, max_instances=1)
    hosts.append(host)
    in_flight = await acquire(scheduler, "a")
    wants_b = asyncio.ensure_future(acquire(scheduler, "b"))
    await wait_for(lambda: host.state("a") is ModelState.UNLOADING, "a draining for b")
    assert not host.server("a").stopped  # its request is still running
    assert not wants_b.done()
    scheduler.release(in_flight)
    scheduler.release(await wants_b)
    assert host.server("a").stopped
    assert host.state("b") is ModelState.LOADED


async def test_an_idle_model_is_unloaded_after_its_ttl(
    models_dir: Path, hosts: list[FakeHost]
) -> None:
    host, scheduler = await started_host(models_dir, {"a": {"ttl": 0.3}, "b": {}})
    hosts.append(host)
    scheduler.release(await acquire(scheduler, "a"))
    scheduler.release(await acquire(scheduler, "b"))
    assert host.state("a") is ModelState.LOADED  # not before its TTL
    await wait_for(lambda: host.state("a") is ModelState.UNLOADED, "a's TTL", 5.0)
    assert host.server("a").stopped
    assert host.state("b") is ModelState.LOADED  # no TTL: it stays


async def test_a_model_that_never_starts_refuses_its_waiters_with_the_reason(
    models_dir: Path, hosts: list[FakeHost]
) -> None:
    host, scheduler = await started_host(models_dir, {"bad": {}}, failing=("bad",))
    hosts.append(host)
    with pytest.raises(NoCapacity, match="failed to start: exit 1"):
        await acquire(scheduler, "bad")
    assert "exit 1; last log lines: x" in host.last_error["bad"]
    assert host.server("bad").stopped
    assert host.state("bad") is ModelState.UNLOADED
