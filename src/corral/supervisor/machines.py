"""The other machines a model host places models on: agents that are model hosts.

An agent started with ``--models-dir`` (:mod:`corral.supervisor.host_agent`) tells every
balancer what it can start and the room it has (:class:`corral.protocol.HostReport`)
and starts or stops servers when told. On the balancer, a :class:`RemoteMachine` holds
the last report and sends the commands; :class:`~corral.supervisor.host.ModelHost`
plans loads over its own machine (``corral serve``) and every remote one with the same
planner, and carries a load out on a remote machine through a :class:`RemoteServer`,
which stands where a local :class:`~corral.supervisor.managed.ManagedInstance` would:
``start`` asks the host to load, ``supervisor.wait_ready`` follows the host's reports,
``stop`` asks it to unload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.catalog.gguf_header import WeightLayout
from corral.catalog.model import CatalogModel
from corral.config import ModelConfig
from corral.hosting import LoadRefused
from corral.protocol import HostInstanceReport, HostReport
from corral.supervisor.devices import OutOfMemory

log = logging.getLogger(__name__)

#: The machine id of the host's own (``corral serve``'s) machine.
LOCAL = "local"

#: Seconds a load or unload command waits for the host's answer.
COMMAND_TIMEOUT = 30.0

Send = Callable[[dict[str, Any], float], Awaitable[dict[str, Any] | None]]
"""Sends a command frame to a host and waits (at most the seconds given) for its
``command_result``; None when the host is gone or does not answer."""


#: A replica's key: its pool's, then ``#r`` and a number (the first instance has none).
_REPLICA = re.compile(r"#r\d+$")


def pool_of(key: str) -> str:
    """The pool (what requests name) a replica's key belongs to."""
    return _REPLICA.sub("", key)


def replica_key(pool: str, number: int) -> str:
    return pool if number <= 1 else f"{pool}#r{number}"


def rendezvous(model: str, machine: str) -> int:
    """A stable order of machines for one model, the same on every balancer: among
    equally good machines, the one with the highest score gets the load (so two
    balancers that see the same fleet pick the same host)."""
    return int.from_bytes(hashlib.sha256(f"{model}\0{machine}".encode()).digest()[:8], "big")


class RemoteMachine:
    """A model host the balancer can reach, as its last report says."""

    def __init__(self, report: HostReport, send: Send) -> None:
        self.id = report.id
        self.send = send
        self.report = report
        self.models: dict[str, CatalogModel] = {}
        self.changed = asyncio.Event()
        """Set on every report (a waiting start looks again)."""
        self.gone = False
        """Its connection ended: a start waiting on it fails at once."""
        self.update(report)

    def update(self, report: HostReport) -> None:
        self.report = report
        models = {}
        for entry in report.models:
            weights = None
            if entry.layers:
                weights = WeightLayout(entry.layers, entry.embedding, entry.output, entry.tied)
            models[entry.id] = CatalogModel(
                id=entry.id,
                path=None,
                size_bytes=entry.size_bytes,
                architecture=entry.architecture,
                context_length=entry.context_length,
                quantization=entry.quantization,
                aliases=entry.aliases,
                source="manual",
                kv_bytes_per_token=entry.kv_bytes_per_token,
                weights=weights,
                config=ModelConfig(
                    path=Path(entry.id), args=list(entry.args), aliases=list(entry.aliases)
                ),
            )
        self.models = models
        self.changed.set()
        self.changed = asyncio.Event()

    def leave(self) -> None:
        self.gone = True
        self.changed.set()

    def get(self, name: str) -> CatalogModel | None:
        model = self.models.get(name)
        if model is not None:
            return model
        return next((m for m in self.models.values() if name in m.aliases), None)

    def instance(self, key: str) -> HostInstanceReport | None:
        return next((i for i in self.report.instances if i.key == key), None)

    @property
    def label(self) -> str:
        return self.report.name or self.id


class RemoteSupervisor:
    """What the model host reads of a remote server's start."""

    def __init__(self, machine: RemoteMachine, key: str, startup_timeout: float) -> None:
        self.machine = machine
        self.key = key
        self.startup_timeout = startup_timeout
        self.last_error: str | None = None
        self.out_of_memory: OutOfMemory | None = None
        self.devices: tuple[Any, ...] = ()

    async def wait_ready(self) -> bool:
        """True once the host reports the server ready; False when it failed, left, or
        did not come up within ``startup_timeout``."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.machine.gone:
                self.last_error = f"its host {self.machine.label} left while it started"
                return False
            report = self.machine.instance(self.key)
            if report is not None and report.state == "ready":
                return True
            if report is not None and report.state in ("failed", "stopped"):
                self.last_error = report.error or f"it is {report.state} on {self.machine.label}"
                if report.oom_device:
                    device = None if report.oom_device == "RAM" else report.oom_device
                    self.out_of_memory = OutOfMemory(device, None, report.error or "")
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                self.last_error = f"was not ready within {self.startup_timeout:g} s"
                return False
            changed = self.machine.changed
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await changed.wait()
            except TimeoutError:
                pass


class RemoteServer:
    """A server on a remote model host, as the model host drives it."""

    scheme = "http"

    def __init__(
        self,
        machine: RemoteMachine,
        key: str,
        model: str,
        flags: tuple[str, ...],
        devices: tuple[str, ...],
        startup_timeout: float,
    ) -> None:
        self.machine = machine
        self.key = key
        self.model = model
        self.flags = flags
        self.devices = devices
        self.url = ""
        self.supervisor = RemoteSupervisor(machine, key, startup_timeout)

    async def start(self) -> None:
        """Ask the host to start the server; :class:`LoadRefused` when it will not."""
        result = await self.machine.send(
            {
                "command": "load",
                "key": self.key,
                "pool": pool_of(self.key),
                "model": self.model,
                "flags": list(self.flags),
                "devices": list(self.devices),
            },
            COMMAND_TIMEOUT,
        )
        if result is None:
            raise LoadRefused(f"host {self.machine.label} did not answer the load of {self.key!r}")
        if not result.get("ok"):
            raise LoadRefused(
                f"host {self.machine.label} refused to load {self.key!r}: "
                f"{result.get('detail') or 'no reason given'}"
            )
        self.url = str(result.get("url") or "")
        log.info("remote load key=%s host=%s url=%s", self.key, self.machine.label, self.url)

    async def stop(self) -> None:
        """Ask the host to stop the server (the balancer drained it first)."""
        if self.machine.gone:
            return
        result = await self.machine.send({"command": "unload", "key": self.key}, COMMAND_TIMEOUT)
        if result is None or not result.get("ok"):
            detail = "no answer" if result is None else result.get("detail")
            log.warning(
                "remote unload key=%s host=%s failed: %s", self.key, self.machine.label, detail
            )
