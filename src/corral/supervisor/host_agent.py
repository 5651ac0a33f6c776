"""An agent that is a model host: ``corral agent --balancer ADDR --models-dir DIR``.

It tells every balancer what it can start (its catalog: ids, aliases, sizes, what the
headers say for memory estimates, the arguments it runs each with), the room it has
(memory, devices) and what it runs (:class:`corral.protocol.HostReport`), on every
change and once a second; and it starts or stops a llama-server when a balancer says so
(``load``, ``unload``). Each server it starts is a
:class:`~corral.supervisor.managed.ManagedInstance`, supervised and reported as every
owned instance is (its own agent link to each balancer; it drains before it stops).

The balancer decides (:class:`~corral.supervisor.host.ModelHost` with the same planner
as ``corral serve``); the host only refuses what it cannot do: a model it does not
have, a pool it already runs (a second balancer's duplicate: it gets the running
server's address), more than ``--max-instances`` servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from corral import __version__
from corral.agent import balancer_socket_url
from corral.catalog.catalog import Catalog
from corral.catalog.memory import available_bytes, estimate_memory, total_bytes
from corral.catalog.model import CatalogModel
from corral.protocol import (
    DeviceReport,
    HostInstanceReport,
    HostModelReport,
    HostReport,
)
from corral.supervisor.devices import list_devices, nvml_memory
from corral.supervisor.managed import ManagedInstance, check_reserved
from corral.supervisor.process import PortLease

log = logging.getLogger(__name__)

#: Seconds between reports when nothing changed.
REPORT_INTERVAL = 1.0

MakeInstance = Callable[
    [str, CatalogModel, list[str], list[str]], tuple[ManagedInstance, PortLease]
]
"""Builds the server of a pool: (key, model, aliases, llama-server arguments) ->
the managed instance and its port lease (the CLI's settings decide the rest)."""


@dataclass
class HostAgentOptions:
    balancers: list[str]
    cluster_token: str
    binary: Path
    name: str = field(default_factory=socket.gethostname)
    max_instances: int = 4
    llama_args: list[str] = field(default_factory=list)
    """Arguments every server gets (the settings' ``llama_args``)."""
    tls: Any = None
    """What ``wss://`` balancers are verified with (an ``ssl.SSLContext``), or None."""
    memory_limit: int | None = None
    """Bytes of RAM its servers may take in all (``--max-memory``); None: the machine's."""


@dataclass
class Served:
    key: str
    model: str
    flags: tuple[str, ...]
    instance: ManagedInstance
    estimate: int = 0
    """RAM it is expected to take (for ``--max-memory``)."""


class HostAgent:
    """A model host's agent: see the module doc."""

    def __init__(self, catalog: Catalog, options: HostAgentOptions, make: MakeInstance) -> None:
        self.catalog = catalog
        self.options = options
        self.make = make
        self.id = f"host-{options.name}-{uuid.uuid4().hex[:8]}"
        self.served: dict[str, Served] = {}
        self.seq = 0
        self.devices: tuple[DeviceReport, ...] = ()
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- what it reports --------------------------------------------------------------------

    def report(self) -> HostReport:
        models = []
        for model in self.catalog.models:
            config = model.config
            if config is not None and config.cmd is not None:
                continue  # command templates run under `corral serve` only, so far
            weights = model.weights
            models.append(
                HostModelReport(
                    id=model.id,
                    aliases=model.aliases,
                    size_bytes=model.size_bytes,
                    architecture=model.architecture,
                    context_length=model.context_length,
                    quantization=model.quantization,
                    kv_bytes_per_token=model.kv_bytes_per_token,
                    layers=weights.layers if weights is not None else (),
                    embedding=weights.embedding if weights is not None else 0,
                    output=weights.output if weights is not None else 0,
                    tied=weights.tied if weights is not None else False,
                    args=tuple(self._args(model)),
                    projector=model.mmproj is not None,
                )
            )
        live = nvml_memory() or {}
        devices = tuple(
            DeviceReport(d.name, d.description, live[d.name][0] >> 20, live[d.name][1] >> 20)
            if d.name in live
            else d
            for d in self.devices
        )
        instances = []
        for served in self.served.values():
            supervisor = served.instance.supervisor
            oom = supervisor.out_of_memory
            instances.append(
                HostInstanceReport(
                    key=served.key,
                    model=served.model,
                    url=served.instance.agent.url,
                    flags=served.flags,
                    # served and not stopped by an unload: "stopped" is a start that
                    # has not begun yet
                    state="starting" if supervisor.state == "stopped" else supervisor.state,
                    error=supervisor.last_error or None,
                    oom_device=(oom.device or "RAM") if oom is not None else None,
                )
            )
        total, available = total_bytes(), available_bytes()
        limit = self.options.memory_limit
        if limit is not None:  # a budget: what its servers are expected to take counts
            used = sum(s.estimate for s in self.served.values())
            total, available = min(total, limit), min(available, max(0, limit - used))
        return HostReport(
            id=self.id,
            name=self.options.name,
            max_instances=self.options.max_instances,
            memory_total=total,
            memory_available=available,
            devices=devices,
            devices_live=bool(devices) and all(d.name in live for d in self.devices),
            models=tuple(models),
            instances=tuple(instances),
        )

    def _args(self, model: CatalogModel) -> list[str]:
        config = model.config
        args = [*self.options.llama_args, *(config.args if config is not None else [])]
        mmproj = (config.mmproj if config is not None else None) or model.mmproj
        if mmproj is not None and "--mmproj" not in args:
            args += ["--mmproj", str(mmproj)]
        return args

    # -- what it does when told -------------------------------------------------------------

    async def load(self, data: dict[str, Any]) -> dict[str, Any]:
        key, model_id = str(data.get("key") or ""), str(data.get("model") or "")
        flags = [str(f) for f in data.get("flags") or []]
        devices = [str(d) for d in data.get("devices") or []]
        async with self._lock:
            running = self.served.get(key)
            if running is not None:  # a second balancer's load of the same pool
                return {"ok": True, "url": running.instance.agent.url, "detail": "already runs"}
            model = self.catalog.get(model_id)
            if model is None or model.path is None:
                return {"ok": False, "detail": f"this host has no model {model_id!r}"}
            if len(self.served) >= self.options.max_instances:
                return {
                    "ok": False,
                    "detail": f"this host runs {len(self.served)} servers (--max-instances)",
                }
            try:
                check_reserved(flags)
            except ValueError as exc:
                return {"ok": False, "detail": str(exc)}
            args = [*self._args(model), *flags]
            if devices:
                args += ["--device", ",".join(devices)]
            aliases = list(model.aliases) if not flags else []
            pool = str(data.get("pool") or key)  # a replica answers for its pool
            instance, lease = self.make(pool, model, aliases, args)
            try:
                await instance.start()
            except Exception:
                lease.release()
                raise
            estimate = estimate_memory(model, args, list(devices)).ram
            self.served[key] = Served(key, model.id, tuple(flags), instance, estimate)
            reported = instance.supervisor.on_change  # its own agent's report

            def changed(supervised: Any) -> None:
                if reported is not None:
                    reported(supervised)
                self._changed.set()  # a start's progress goes in the next host report

            instance.supervisor.on_change = changed
        log.info("loaded key=%s model=%s url=%s", key, model.id, instance.agent.url)
        self._changed.set()
        return {"ok": True, "url": instance.agent.url}

    async def unload(self, data: dict[str, Any]) -> dict[str, Any]:
        key = str(data.get("key") or "")
        served = self.served.pop(key, None)
        if served is None:
            return {"ok": True, "detail": "not running"}
        self._changed.set()
        await served.instance.stop()
        log.info("unloaded key=%s", key)
        self._changed.set()
        return {"ok": True}

    # -- the links ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.devices = await list_devices(self.options.binary, dict(os.environ))
        async with aiohttp.ClientSession() as session:
            links = [
                asyncio.create_task(self._link(session, balancer_socket_url(b)), name=f"host-{b}")
                for b in self.options.balancers
            ]
            try:
                await self._stopping.wait()
            finally:
                for link in links:
                    link.cancel()
                await asyncio.gather(*links, return_exceptions=True)

    async def stop(self) -> None:
        """Stop the links, then every server (each drains first)."""
        self._stopping.set()
        await asyncio.gather(*(s.instance.stop() for s in self.served.values()))
        self.served.clear()

    async def _link(self, session: aiohttp.ClientSession, url: str) -> None:
        backoff = 0.5
        headers = {"Authorization": f"Bearer {self.options.cluster_token}"}
        while not self._stopping.is_set():
            try:
                async with session.ws_connect(
                    url, headers=headers, heartbeat=5.0, ssl=self.options.tls or True
                ) as ws:
                    backoff = 0.5
                    log.info("model host connected balancer=%s host=%s", url, self.id)
                    await self._talk(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("balancer unreachable balancer=%s error=%s", url, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, 10.0)

    async def _talk(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_json(
            {
                "type": "register",
                "agent_id": self.id,
                "name": self.options.name,
                "version": __version__,
                "role": "host",
            }
        )
        reader = asyncio.create_task(self._read(ws), name="host-reader")
        try:
            while not reader.done() and not self._stopping.is_set():
                self._changed.clear()
                self.seq += 1
                await ws.send_json(
                    {"type": "host", "seq": self.seq, "host": self.report().to_wire()}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), REPORT_INTERVAL)
        except ConnectionResetError:
            pass
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                data = json.loads(message.data)
            except ValueError:
                continue
            if not isinstance(data, dict) or data.get("type") != "host_command":
                continue
            asyncio.create_task(self._command(ws, data), name="host-command")  # noqa: RUF006

    async def _command(self, ws: aiohttp.ClientWebSocketResponse, data: dict[str, Any]) -> None:
        command = data.get("command")
        try:
            if command == "load":
                result = await self.load(data)
            elif command == "unload":
                result = await self.unload(data)
            else:
                result = {"ok": False, "detail": f"unknown command {command!r}"}
        except Exception as exc:  # a failing command must not end the connection
            log.exception("host command failed command=%s", command)
            result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(ConnectionResetError):
            await ws.send_json({**result, "type": "command_result", "id": data.get("id")})
