"""The model host: starts llama-servers on demand, within the machine's limits.

``corral serve`` runs one. A request for a model the catalog knows but no instance
serves makes the scheduler call :meth:`ModelHost.request`; the host queues a load and
the request waits in the buffer until the instance is ready. Loads are planned one at
a time (making room, then starting the process), so many concurrent requests for one
model cause one start, and each load sees the machine as the previous one left it;
the wait until a started server serves runs beside the next loads, so a slow or
hanging start never holds up other models (its memory estimate counts as taken, and
an exclusive group's member still starting is swapped out only once it serves).

What to evict, when to start and when an idle model goes are decided by the pure
planner, :mod:`corral.supervisor.planner` (its doc gives the rules: the load's
exclusive group, then ``max_instances``, 4 unless set like llama-server's router mode,
least recently used first, then memory: the model's estimate, file size + KV cache,
see :func:`corral.catalog.memory.estimate_bytes`, against what psutil says is
available). This class reads the state the planner needs off its instances and the
scheduler, and carries the plan out: drains and stops, starts, events, waits.

**An instance with requests in flight is never killed to make room**: unloading first
drains it (the balancer places nothing new on it; in-flight requests finish), bounded
by ``drain_timeout``. If it does not drain in time the eviction is called off, the
instance serves again, and the load waits for its next chance; the waiting requests
are bounded by their own buffer timeout. An alternating stream A, B, A, B therefore
runs as batches: a busy A first keeps taking requests for up to ``swap_hold`` seconds
(or until it is idle), then drains while B's requests wait; once B is up they all go
at once, and A's requests that came meanwhile wait for the next swap.

An idle TTL (``models.M.ttl``, else ``model_ttl``) unloads an instance that has had
nothing in flight and nothing waiting for that long.

Nothing here polls: a load waiting for room plans again at the scheduler's next
change (a release, a report, a load or unload event), at the end of its swap hold, or
after :data:`REPLAN_LIMIT` at the latest (memory freed outside corral is no event);
the TTL task sleeps until the planner's next expiry or until an instance is loaded.

All of this runs on the balancer's event loop and reads the balancer's scheduler
directly: in-flight counts and buffers are exact there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.catalog.catalog import Catalog
from corral.catalog.memory import (
    DEVICE_FLAGS,
    MemoryNeed,
    available_bytes,
    estimate_bytes,
    estimate_memory,
    format_bytes,
    gpu_layers,
    pinned_devices,
    total_bytes,
)
from corral.catalog.model import CatalogModel
from corral.config import ModelConfig, Settings
from corral.fleet.state import Instance
from corral.hosting import LoadRefused, ModelState
from corral.protocol import DeviceReport, HostReport
from corral.scheduling.scheduler import NoCapacity, Scheduler, SchedulingError
from corral.supervisor.devices import CUDA_DEVICE_ORDER, list_devices, nvml_memory
from corral.supervisor.instance import supervisor_options
from corral.supervisor.machines import (
    LOCAL,
    RemoteMachine,
    RemoteServer,
    Send,
    pool_of,
    rendezvous,
    replica_key,
)
from corral.supervisor.managed import ManagedInstance, ManagedOptions
from corral.supervisor.planner import (
    Evict,
    Limits,
    Load,
    Placement,
    Plan,
    Refuse,
    Resident,
    Start,
    Wait,
    idle_expired,
    next_expiry,
    place,
    plan_replicas,
)
from corral.supervisor.process import PortLease, lease_port
from corral.tokens import state_dir

log = logging.getLogger(__name__)

#: Instances one host runs when ``max_instances`` is unset (router mode's --models-max).
DEFAULT_MAX_INSTANCES = 4

#: The longest a load waiting for room goes without planning again: the memory other
#: processes free is no scheduler event.
REPLAN_LIMIT = 1.0

#: The longest the replica planner goes without looking at demand.
REPLICA_CHECK = 0.25

#: Seconds the TTL task sleeps past an expiry, so that the instance's idle time is
#: surely over when it looks (clocks round).
TTL_SLACK = 0.01


#: Seconds a model run with per-request flags that failed to start is refused at once
#: (with the reason) instead of being started again.
FAILED_FLAGS_HOLD = 60.0


class FlagsRefused(SchedulingError):
    """A request's per-request flags cannot run here: the client's to change (400)."""

    status = 400
    error_type = "invalid_request_error"


@dataclass(eq=False)
class Hosted:
    """One llama-server this host started: a model (with flags) at one port."""

    key: str
    """Pool name: the model id, or ``ID+FLAGS`` for an instance with per-request flags."""
    model: CatalogModel
    flags: tuple[str, ...]
    managed: ManagedInstance
    url: str
    estimate: int
    state: ModelState = ModelState.LOADING
    last_used: float = 0.0
    """Scheduler clock when its load began (requests update the fleet instance's)."""
    devices: dict[str, int] = dataclasses.field(default_factory=dict)
    """Bytes it is expected to take on each GPU."""
    placed: tuple[str, ...] = ()
    """The devices corral chose for it (``--device``); () when its arguments say."""
    machine: str = LOCAL
    """Where it runs: this machine, or a remote model host's id."""


@dataclass
class HostOptions:
    binary: Path | None
    """llama-server; None: none was found, only command-template models load."""
    balancer: str
    """Management address of the balancer the instances report to."""
    cluster_token: str
    tls: ssl.SSLContext | None = None
    """What the instances' agents verify the balancer's TLS listener with."""


class ModelHost:
    """Loads and unloads models on this machine; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        scheduler: Scheduler,
        options: HostOptions,
        *,
        memory: Callable[[], int] = available_bytes,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.scheduler = scheduler
        self.options = options
        self.memory = memory
        self.running: dict[str, Hosted] = {}
        self.pending: deque[str] = deque()
        self.loading: str | None = None
        """The key whose load is under way (making room or starting)."""
        self.explicit: set[str] = set()
        """Keys loaded by an operator (load API, preload): loaded even if nobody waits."""
        self.last_error: dict[str, str] = {}
        self.loads = 0
        """llama-servers started (one per load)."""
        self._flags: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._failed_flags: dict[str, tuple[float, str]] = {}
        """Flagged keys whose start failed: (until, reason); refused at once till then."""
        self.out_of_memory: dict[str, dict[str, int]] = {}
        """Keys that ran out of memory on a device: device -> its free bytes then. The
        key is not placed there again until that device has more free than that."""
        self.devices: tuple[DeviceReport, ...] = ()
        """The GPUs llama-server reported when a load last asked (none: CPU only)."""
        self.remotes: dict[str, RemoteMachine] = {}
        """Model hosts on other machines (agents with --models-dir), by host id."""
        self.pinned: dict[str, str] = {}
        """Keys an operator loads on a chosen machine (until that load is done)."""
        self.local = True
        """Whether this machine hosts models itself (``corral serve``); a balancer's
        fleet host only places them on remote ones."""
        self.total_memory = total_bytes
        self._wake = asyncio.Event()
        self._ttl_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._starting: set[asyncio.Task[Any]] = set()
        """Started servers being waited for until they serve (see :meth:`_come_up`)."""
        self._stopping = False

    @property
    def max_instances(self) -> int:
        return self.settings.max_instances or DEFAULT_MAX_INSTANCES

    # -- the catalogs: this machine's, then the remote hosts' ------------------------------

    def models(self) -> list[CatalogModel]:
        """Every model some machine can start (by id; this machine's first)."""
        found: dict[str, CatalogModel] = {}
        if self.local:
            found.update((m.id, m) for m in self.catalog.models)
        for machine in sorted(self.remotes.values(), key=lambda r: r.id):
            for model in machine.models.values():
                found.setdefault(model.id, model)
        return sorted(found.values(), key=lambda m: m.id)

    def _get(self, name: str) -> CatalogModel | None:
        model = self.catalog.get(name) if self.local else None
        if model is not None:
            return model
        for machine in sorted(self.remotes.values(), key=lambda r: r.id):
            model = machine.get(name)
            if model is not None:
                return model
        return None

    def machines_for(self, model_id: str) -> list[str]:
        """The machines that can start ``model_id``."""
        found = [LOCAL] if self.local and self.catalog.get(model_id) is not None else []
        found += sorted(r.id for r in self.remotes.values() if model_id in r.models)
        return found

    def _machine_model(self, machine: str, model_id: str) -> CatalogModel | None:
        if machine == LOCAL:
            return self.catalog.get(model_id)
        remote = self.remotes.get(machine)
        return remote.models.get(model_id) if remote is not None else None

    # -- remote model hosts (the management API's agent socket calls these) ---------------

    def remote_report(self, report: HostReport, send: Send) -> None:
        """A model host reported: note what it can start and runs; adopt servers it runs
        that this host does not know (after a balancer restart), so none loads twice."""
        machine = self.remotes.get(report.id)
        changed = machine is None
        if machine is None:
            machine = RemoteMachine(report, send)
            self.remotes[report.id] = machine
            log.info(
                "model host joined host=%s models=%d memory_available=%s",
                machine.label,
                len(machine.models),
                format_bytes(report.memory_available),
            )
            self._wake.set()  # loads waiting for a host that has their model
        else:
            machine.send = send
            machine.update(report)
        reported = {i.key for i in report.instances}
        for key, hosted in list(self.running.items()):
            if hosted.machine == machine.id and hosted.state is ModelState.LOADED:
                if key not in reported:  # stopped there (another balancer, an operator)
                    del self.running[key]
                    changed = True
                    log.info("gone from its host key=%s host=%s", key, machine.label)
        for instance in report.instances:
            if instance.key in self.running or instance.state not in ("ready", "starting"):
                continue
            model = machine.models.get(instance.model)
            if model is None:
                continue
            if instance.flags:  # its pool's flags (a replica's key names its pool)
                self._flags[pool_of(instance.key)] = (instance.model, instance.flags)
            changed = True
            starting = instance.state == "starting"  # another balancer's load under way
            server = RemoteServer(
                machine,
                instance.key,
                instance.model,
                instance.flags,
                (),
                self.settings.startup_timeout,
            )
            server.url = instance.url
            need = estimate_memory(model, self._args(model, instance.flags))
            hosted = Hosted(
                key=instance.key,
                model=model,
                flags=instance.flags,
                managed=server,  # type: ignore[arg-type]  # what the host uses of one
                url=instance.url,
                estimate=need.ram,
                state=ModelState.LOADING if starting else ModelState.LOADED,
                last_used=self.scheduler.clock(),
                machine=machine.id,
            )
            self.running[instance.key] = hosted
            log.info(
                "adopted key=%s host=%s url=%s state=%s",
                instance.key,
                machine.label,
                instance.url,
                instance.state,
            )
            if starting:
                now = self.scheduler.clock()
                self._beside(
                    self._come_up(hosted, now, 0, time.monotonic()),
                    name=f"host-adopt-{instance.key}",
                )
        if changed:  # not every report: a host reports every second
            self.scheduler.emit({"type": "host", "host": machine.id})

    def remote_gone(self, host_id: str) -> None:
        """A model host left: what it ran is gone from here (its instances leave their
        pools with their own agents); requests waiting for them load them elsewhere."""
        machine = self.remotes.pop(host_id, None)
        if machine is None:
            return
        machine.leave()
        lost = [k for k, h in self.running.items() if h.machine == host_id]
        for key in lost:
            del self.running[key]
        for pool in {pool_of(k) for k in lost}:
            if self.scheduler.buffered(pool) and not self._stopping:
                self.request(pool)
        log.warning("model host left host=%s lost=%s", machine.label, lost)
        self.scheduler.emit({"type": "host", "host": host_id, "event": "gone"})

    # -- Loader protocol (the scheduler's view) -------------------------------------------

    def resolve(self, name: str) -> str | None:
        if name in self._flags:
            return name
        model = self._get(name)
        return model.id if model is not None else None

    def listed(self) -> list[str]:
        return [m.id for m in self.models() if not self._config(m).unlisted]

    def names(self) -> list[str]:
        names: list[str] = []
        for model in self.models():
            if not self._config(model).unlisted:
                names += [model.id, *model.aliases]
        return names

    def request(self, model: str) -> bool:
        """Queue a load of ``model`` unless an instance is up, coming or queued (a
        replica counts: more of them are the replica planner's to start)."""
        hosted = self.running.get(model)
        if hosted is None and model == pool_of(model):
            hosted = next(
                (h for h in self.running.values()
                 if pool_of(h.key) == model and h.state is not ModelState.UNLOADING),
                None,
            )  # fmt: skip
        if hosted is not None and hosted.state is not ModelState.UNLOADING:
            return hosted.state is ModelState.LOADING
        if model not in self.pending:
            if self._spec(model) is None:
                return False
            self.last_error.pop(model, None)  # a new attempt: the last failure is history
            self.pending.append(model)
            self._wake.set()
        return True

    def model_config(self, key: str) -> ModelConfig | None:
        """The config of the model ``key`` names (a pool name, flags and all)."""
        spec = self._spec(key)
        return self._config(spec[0]) if spec is not None else None

    # -- operator actions -------------------------------------------------------------

    def flagged_key(self, model: str, flags: tuple[str, ...]) -> str:
        """The pool name of ``model`` run with normalized per-request ``flags``."""
        if not flags:
            return model
        import hashlib

        digest = hashlib.sha256("\0".join(flags).encode()).hexdigest()[:10]
        key = f"{model}+{digest}"
        self._flags[key] = (model, flags)
        return key

    def refuse_flags(self, key: str) -> str | None:
        """Why the flagged pool ``key`` must not start (a client's 400), or None: its
        estimate is more than this machine's memory in all, or it failed to start
        less than :data:`FAILED_FLAGS_HOLD` seconds ago."""
        spec = self._spec(key)
        if spec is None or not spec[1]:
            return None
        failed = self._failed_flags.get(key)
        if failed is not None:
            until, reason = failed
            if time.monotonic() < until:
                return (
                    f"{reason} (these flags failed within the last {FAILED_FLAGS_HOLD:g} s; "
                    "corral refuses them until then: change them)"
                )
            del self._failed_flags[key]
        model, flags = spec
        if self._config(model).cmd is not None or not self.settings.memory_check:
            return None
        estimate = estimate_bytes(model, self._args(model, flags))
        total = self.total_memory()
        if estimate > total:
            return (
                f"flags {' '.join(flags)} need about {format_bytes(estimate)} for model "
                f"{model.id!r} (weights + KV cache), more than this host's "
                f"{format_bytes(total)} in all: lower -c (--ctx-size) or --parallel"
            )
        return None

    def forget_failures(self, model_id: str) -> None:
        """Forget where ``model_id`` (and its flagged pools) ran out of memory: its
        settings changed, so it may fit now."""
        for key in list(self.out_of_memory):
            if key == model_id or self._flags.get(key, ("",))[0] == model_id:
                del self.out_of_memory[key]

    def load(self, model: str, host: str | None = None) -> str:
        """Load ``model`` (an id or alias) even with nobody waiting; its key. ``host``
        (a model host's name or id, or ``local``) puts it there rather than where the
        planner would; :class:`LoadRefused` when that machine cannot start it."""
        key = self.resolve(model)
        if key is None:
            raise LoadRefused(f"unknown model {model!r}")
        if host is not None:
            machine = self._machine_named(host)
            spec = self._spec(key)
            if machine is None:
                raise LoadRefused(f"no model host {host!r}")
            if spec is None or machine not in self.machines_for(spec[0].id):
                raise LoadRefused(f"model host {host!r} cannot start {model!r}")
            self.pinned[key] = machine
        self.explicit.add(key)
        self.request(key)
        return key

    def _machine_named(self, name: str) -> str | None:
        if name == LOCAL:
            return LOCAL if self.local else None
        for machine in self.remotes.values():
            if name in (machine.id, machine.report.name):
                return machine.id
        return None

    def hosts(self) -> list[dict[str, Any]]:
        """Every machine models run on, with its room and servers (``GET /api/v1/hosts``)."""
        rows = []
        machines: list[tuple[str, str, int, int, int, tuple[DeviceReport, ...], list[str]]] = []
        if self.local:
            machines.append((
                LOCAL, socket.gethostname(), self.total_memory(), self.memory(),
                self.max_instances, self.devices, [m.id for m in self.catalog.models],
            ))  # fmt: skip
        for remote in sorted(self.remotes.values(), key=lambda r: r.label):
            report = remote.report
            machines.append((
                remote.id, remote.label, report.memory_total, report.memory_available,
                report.max_instances, report.devices, sorted(remote.models),
            ))  # fmt: skip
        for machine, name, total, available, most, devices, models in machines:
            rows.append(
                {
                    "id": machine,
                    "name": name,
                    "memory_total": total,
                    "memory_available": available,
                    "max_instances": most,
                    "devices": [d.to_wire() for d in devices],
                    "models": models,
                    "servers": [
                        {"key": h.key, "model": h.model.id, "state": h.state.value, "url": h.url}
                        for h in self.running.values()
                        if h.machine == machine
                    ],
                }
            )
        return rows

    async def wait_loaded(self, key: str, timeout: float) -> bool:  # noqa: ASYNC109
        """True once ``key`` serves; False when its load failed or after ``timeout``."""

        def loaded() -> bool:
            hosted = self.running.get(key)
            return hosted is not None and hosted.state is ModelState.LOADED

        def settled() -> bool:
            failed = key not in self.pending and key not in self.running
            return loaded() or (failed and key in self.last_error)

        # every change of a load is a scheduler event (loading, loaded, load_failed)
        await self.scheduler.wait_until(settled, timeout)
        return loaded()

    async def unload(self, model: str, *, reason: str = "operator") -> bool:
        """Drain and stop every instance of ``model``; False if one did not drain."""
        key = self.resolve(model) or model
        self.explicit.discard(key)
        with contextlib.suppress(ValueError):
            self.pending.remove(key)
        done = True
        for hosted in [h for h in self.running.values() if h.key == key or h.model.id == key]:
            done = await self._unload(hosted, reason) and done
        return done

    def status(self) -> list[dict[str, Any]]:
        """Every catalog model with its state, for ``/v1/models`` and the management API."""
        rows = []
        running_on = {
            h.model.id: self._label(h.machine, local="local") for h in self.running.values()
        }
        for model in self.models():
            config = self._config(model)
            rows.append(
                {
                    "id": model.id,
                    "aliases": list(model.aliases),
                    "state": self.state(model.id).value,
                    "unlisted": config.unlisted,
                    "group": config.group,
                    "size_bytes": model.size_bytes,
                    "context_length": model.context_length,
                    "quantization": model.quantization,
                    "source": model.source,
                    "server": "command" if config.cmd is not None else "llama-server",
                    "error": self.last_error.get(model.id),
                    "args": self._args(model, ()),
                    "created": _mtime(model.path),
                    "hosts": [self._label(m, local="local") for m in self.machines_for(model.id)],
                    "running_on": running_on.get(model.id),
                }
            )
        return rows

    def state(self, key: str) -> ModelState:
        """Where ``key`` stands: a queued load counts as loading, and a started server
        its agent has reported usable as loaded (the host notes it a moment later)."""
        hosted = self.running.get(key)
        if hosted is not None:
            instance = self._instance(hosted)
            if (
                hosted.state is ModelState.LOADING
                and instance is not None
                and instance.usable(self.scheduler.clock())
            ):
                return ModelState.LOADED
            return hosted.state
        if key in self.pending or key == self.loading:
            return ModelState.LOADING
        return ModelState.UNLOADED

    def queued(self, key: str) -> bool:
        return key in self.pending

    @property
    def drain_timeout(self) -> float:
        return self.settings.drain_timeout

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._load_loop(), name="host-loads"),
            asyncio.create_task(self._ttl_loop(), name="host-ttl"),
            asyncio.create_task(self._replica_loop(), name="host-replicas"),
        ]
        for model in self.catalog.models if self.local else []:
            if self._config(model).preload:
                self.load(model.id)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._starting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # the servers on remote model hosts are theirs: they keep serving the fleet
        await asyncio.gather(
            *(h.managed.stop() for h in list(self.running.values()) if h.machine == LOCAL),
            return_exceptions=True,
        )
        self.running.clear()

    # -- internals: specs ---------------------------------------------------------------

    def _config(self, model: CatalogModel) -> ModelConfig:
        config = model.config or ModelConfig(path=model.path, aliases=list(model.aliases))
        if not (self.local and self.catalog.get(model.id) is model):
            # a remote host's model: the host's arguments, this balancer's policies
            # (ttl, group, replicas ...) from its own models table
            policy = self.settings.models.get(model.id)
            if policy is not None:
                return policy.model_copy(update={"args": config.args, "path": config.path})
        return config

    def _spec(self, key: str) -> tuple[CatalogModel, tuple[str, ...]] | None:
        key = pool_of(key)  # a replica runs what its pool runs
        if key in self._flags:
            model_id, flags = self._flags[key]
        else:
            model_id, flags = key, ()
        model = self._get(model_id)
        return (model, flags) if model is not None else None

    def _args(self, model: CatalogModel, flags: tuple[str, ...]) -> list[str]:
        """llama-server's arguments for ``model``; a command template's model: the
        template as written (llama_args and flags never apply to it)."""
        config = self._config(model)
        if config.cmd is not None:
            return list(config.cmd)
        # a remote host's model comes with the arguments that host runs it with
        local = self.local and self.catalog.get(model.id) is model
        args = [*(self.settings.llama_args if local else []), *config.args]
        mmproj = config.mmproj or model.mmproj
        if mmproj is not None and "--mmproj" not in args:
            args += ["--mmproj", str(mmproj)]
        return [*args, *flags]

    def _group(self, model: CatalogModel) -> tuple[str | None, bool, bool]:
        """(group, exclusive, persistent) of a model."""
        name = self._config(model).group
        if name is None:
            return None, False, False
        group = self.settings.groups.get(name)
        if group is None:
            return name, True, False
        return name, group.exclusive, group.persistent

    def _ttl(self, model: CatalogModel) -> float | None:
        ttl = self._config(model).ttl
        return ttl if ttl is not None else self.settings.model_ttl

    def _instance(self, hosted: Hosted) -> Instance | None:
        for instance in self.scheduler.fleet.instances.values():
            if instance.url == hosted.url:
                return instance
        return None

    def _wanted(self, key: str) -> bool:
        return key in self.explicit or self.scheduler.buffered(key) > 0

    # -- internals: the load loop ---------------------------------------------------------

    async def _load_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                key = self.pending.popleft()  # a request meanwhile may queue it again
                self.loading = key
                try:
                    await self._refusing(key, "load", self._load(key))
                finally:
                    self.loading = None
                    self.explicit.discard(key)

    async def _refusing(self, key: str, step: str, action: Awaitable[None]) -> None:
        """Run one step of ``key``'s load; a failure refuses its waiters (see
        :meth:`_refuse`) and never stops the host's later loads."""
        try:
            await action
        except LoadRefused as exc:
            self._refuse(key, str(exc), exc.detail)
        except Exception as exc:
            log.exception("%s failed key=%s", step, key)
            self._refuse(key, f"{type(exc).__name__}: {exc}")

    def _refuse(self, key: str, message: str, detail: str | None = None) -> None:
        """Fail the load of ``key``: its waiters get ``message`` (a 400 when the flags
        they asked for are to blame, else a 503); ``detail`` (log lines and all) is
        kept for the management API and the log."""
        self.last_error[key] = detail or message
        self.pinned.pop(key, None)
        spec = self._spec(key)
        error: SchedulingError = NoCapacity(message)
        if spec is not None and spec[1]:
            self._failed_flags[key] = (time.monotonic() + FAILED_FLAGS_HOLD, message)
            error = FlagsRefused(message)
        failed = self.scheduler.fail_waiters(key, error)
        log.error("load refused key=%s waiting=%d reason=%s", key, failed, detail or message)
        self.scheduler.emit({"type": "model", "model": key, "event": "load_failed"})

    async def _load(self, key: str) -> None:
        spec = self._spec(key)
        if spec is None:
            raise LoadRefused(f"model {key!r} is no longer in the catalog")
        model, flags = spec
        existing = self.running.get(key)
        if existing is not None and existing.state is not ModelState.UNLOADING:
            return
        skip_local = False  # this machine cannot start it, but a remote host may
        if LOCAL in self.machines_for(model.id):
            try:
                await self._check_local(model)
            except LoadRefused:
                if self.machines_for(model.id) == [LOCAL]:
                    raise
                skip_local = True
        group, exclusive, _ = self._group(model)
        clock = self.scheduler.clock
        began = clock()
        evicted = 0
        while True:  # the swap: making room, then starting
            if not self._wanted(key):
                log.info("load dropped key=%s: nobody is waiting any more", key)
                return
            machines = [m for m in self.machines_for(model.id) if not (skip_local and m == LOCAL)]
            if key != pool_of(key):  # a replica: on a host that runs none of its pool
                busy = {h.machine for h in self.running.values()
                        if pool_of(h.key) == pool_of(key) and h.key != key}  # fmt: skip
                machines = [m for m in machines if m not in busy]
                if not machines:
                    raise LoadRefused(f"no other host can start a replica of {pool_of(key)!r}")
            pinned = self.pinned.get(key)
            if pinned is not None:
                machines = [m for m in machines if m == pinned]
                if not machines:
                    raise LoadRefused(f"the model host chosen for {key!r} cannot start it now")
            if not machines:
                # its host left (or is reconnecting): the waiters wait, within their
                # buffer timeout, for a host that has it
                await self.scheduler.next_change(REPLAN_LIMIT)
                continue
            where, chosen, plan = self._plan(
                key, model.id, flags, machines, began, group, exclusive
            )
            if isinstance(plan, Refuse):
                raise LoadRefused(plan.reason)
            if isinstance(plan, Start):
                break
            if isinstance(plan, Wait):
                # nothing can go yet (busy, loading, protected, or held for its batch)
                limit = REPLAN_LIMIT if plan.until is None else plan.until - clock()
                await self.scheduler.next_change(max(0.0, min(limit, REPLAN_LIMIT)))
                continue
            assert isinstance(plan, Evict)
            for victim in plan.keys:
                hosted = self.running.get(victim)
                if hosted is not None and hosted.machine == where:
                    evicted += await self._unload(hosted, f"making room for {key}")
        self.last_error.pop(key, None)
        self.pinned.pop(key, None)
        machine_model = self._machine_model(where, model.id) or model
        await self._start(key, machine_model, flags, chosen, began, evicted, where)

    async def _check_local(self, model: CatalogModel) -> None:
        """What a load on this machine needs: the file, llama-server (unless the model
        runs a command), and the binary's devices."""
        command = self._config(model).cmd is not None
        if model.path is None and not command:
            raise LoadRefused(f"model {model.id!r} has no file (set models.{model.id}.path)")
        if self.options.binary is None and not command:
            raise LoadRefused(
                f"model {model.id!r} needs llama-server, and none was found: install it "
                "(corral llama-server install), or set llama_server or LLAMA_SERVER"
            )
        if not command:
            assert self.options.binary is not None
            self.devices = await list_devices(self.options.binary, self._device_env(model))

    def _plan(
        self,
        key: str,
        model_id: str,
        flags: tuple[str, ...],
        machines: list[str],
        began: float,
        group: str | None,
        exclusive: bool,
    ) -> tuple[str, Placement, Plan]:
        """The machine a load goes to, its placement there and the plan. Each machine is
        planned as ``corral serve`` plans its own (groups, max_instances, memory, only its
        own residents evicted); of those that can start it now the one with the most
        room left wins, then the one needing the fewest evictions; ties go by a hash of
        model and machine, so every balancer seeing the same fleet picks the same one."""
        check = self.settings.memory_check
        planned: list[tuple[str, Placement, Plan, int]] = []
        for machine in machines:
            model = self._machine_model(machine, model_id)
            if model is None:
                continue
            view = self.device_memory(model, machine)
            options = self._placements(key, model, flags, view, began, group, exclusive, machine)
            limits = Limits(
                max_instances=self._max_instances(machine),
                swap_hold=self.settings.swap_hold,
                memory_check=check,
            )
            ram = self._available(machine)
            available = ram if check and options[0].load.estimate else None
            free = {name: left for name, (_, left) in view.items()} if check else None
            residents = self.residents(machine)
            chosen, plan = place(
                options, residents, limits, self.scheduler.clock(), available, free
            )
            room = min(
                [ram - chosen.load.estimate]
                + [
                    free[d] - chosen.load.devices.get(d, 0)
                    for d in chosen.load.devices
                    if free and d in free
                ]
            )
            planned.append((machine, chosen, plan, room))
        if not planned:
            raise LoadRefused(f"no model host can start {model_id!r} now")
        if len(planned) == 1:
            machine, chosen, plan, _ = planned[0]
            return machine, chosen, plan

        def tie(machine: str) -> int:
            return rendezvous(key, machine)

        starts = [p for p in planned if isinstance(p[2], Start)]
        if starts:
            best = max(starts, key=lambda p: (p[3] >> 30, tie(p[0])))  # room by the GiB
            return best[0], best[1], best[2]
        evicts = [p for p in planned if isinstance(p[2], Evict)]
        if evicts:
            best = min(evicts, key=lambda p: (len(p[2].keys), -tie(p[0])))  # type: ignore[union-attr]
            return best[0], best[1], best[2]
        waits = [p for p in planned if isinstance(p[2], Wait)]
        if waits:
            return waits[0][0], waits[0][1], waits[0][2]
        reasons = "; ".join(
            f"on {self._label(m)}: {p.reason}" for m, _, p, _ in planned if isinstance(p, Refuse)
        )
        return planned[0][0], planned[0][1], Refuse(reasons)

    def _label(self, machine: str, local: str = "this machine") -> str:
        remote = self.remotes.get(machine)
        return remote.label if remote is not None else local

    def _max_instances(self, machine: str) -> int:
        remote = self.remotes.get(machine)
        return remote.report.max_instances if remote is not None else self.max_instances

    def _available(self, machine: str) -> int:
        remote = self.remotes.get(machine)
        return remote.report.memory_available if remote is not None else self.memory()

    def residents(self, machine: str | None = LOCAL) -> list[Resident]:
        """The instances on ``machine`` (None: every machine), as the planner sees them."""
        residents = []
        for hosted in self.running.values():
            if machine is not None and hosted.machine != machine:
                continue
            group, _, persistent = self._group(hosted.model)
            instance = self._instance(hosted)
            residents.append(
                Resident(
                    key=hosted.key,
                    state=hosted.state,
                    estimate=hosted.estimate,
                    last_used=max(hosted.last_used, instance.last_used if instance else 0.0),
                    in_flight=instance.in_flight if instance is not None else 0,
                    waiting=self.scheduler.buffered(pool_of(hosted.key)),
                    group=group,
                    persistent=persistent,
                    ttl=self._ttl(hosted.model),
                    queued=hosted.key in self.pending,
                    devices=dict(hosted.devices),
                )
            )
        return residents

    def _device_env(self, model: CatalogModel) -> dict[str, str]:
        """The environment a server of ``model`` will have, as far as its devices go."""
        env = {**os.environ, **self._config(model).env}
        env.setdefault("CUDA_DEVICE_ORDER", CUDA_DEVICE_ORDER)
        return env

    def device_memory(
        self, model: CatalogModel | None = None, machine: str = LOCAL
    ) -> dict[str, tuple[int, int]]:
        """Each GPU's (total, free) bytes now on ``machine``: NVML's live figures where
        they can be read (a remote host reads them itself); otherwise what llama-server
        reported when first asked, less what corral's own servers on it are expected
        to take (those still starting are the planner's to count)."""
        remote = self.remotes.get(machine)
        if remote is not None:
            devices, live_here = remote.report.devices, remote.report.devices_live
            live = (
                {d.name: (d.total_mib << 20, d.free_mib << 20) for d in devices}
                if live_here
                else {}
            )
        else:
            devices = self.devices
            live = nvml_memory(self._device_env(model) if model is not None else None) or {}
        view: dict[str, tuple[int, int]] = {}
        for device in devices:
            if device.name in live:
                view[device.name] = live[device.name]
                continue
            taken = sum(
                h.devices.get(device.name, 0)
                for h in self.running.values()
                if h.state is not ModelState.LOADING and h.machine == machine
            )
            view[device.name] = (device.total_mib * 2**20, device.free_mib * 2**20 - taken)
        return view

    def _placements(
        self,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        view: dict[str, tuple[int, int]],
        began: float,
        group: str | None,
        exclusive: bool,
        machine: str = LOCAL,
    ) -> list[Placement]:
        """Where ``key`` could run, best first. A model whose arguments or environment
        pick its devices (``--device``, ``--tensor-split``, ``--split-mode``,
        ``--main-gpu``, ``-ngl 0``, ``*_VISIBLE_DEVICES``) runs as they say; otherwise
        each GPU alone (most free first, none it ran out of memory on), then all of them
        together. Raises :class:`LoadRefused` when it ran out of memory on every GPU."""
        config = self._config(model)

        def option(devices: tuple[str, ...], need: MemoryNeed) -> Placement:
            load = Load(
                key=key,
                estimate=need.ram,
                began=began,
                group=group,
                exclusive=exclusive,
                devices=dict(need.devices),
            )
            return Placement(devices, load)

        if config.cmd is not None:
            # another server's memory use is unknown; a GGUF file's size is a floor
            floor = estimate_bytes(model, []) if model.size_bytes else 0
            return [option((), MemoryNeed(ram=floor))]
        args = self._args(model, flags)
        names = tuple(view)
        free = {name: left for name, (_, left) in view.items()}
        layers = len(model.weights.layers) if model.weights is not None else 0
        pinned = pinned_devices(args)
        own = (
            pinned is not None
            or any(a.split("=", 1)[0] in DEVICE_FLAGS for a in args)
            or any(k.endswith("_VISIBLE_DEVICES") for k in config.env)
            or (layers > 0 and gpu_layers(args, layers) == 0)
        )
        if not names or own:
            used = pinned if pinned is not None else names
            return [option((), estimate_memory(model, args, used, free))]
        failed = self.out_of_memory.get(_oom_key(key, machine), {})
        usable = [n for n in names if n not in failed or free[n] > failed[n]]
        if not usable:
            tried = ", ".join(sorted(failed))
            raise LoadRefused(
                f"model {key!r} ran out of memory on {tried} when it last started, and "
                "no device has more free memory since: corral does not start it there "
                "again; free memory on a device, offload fewer layers (-ngl) or lower "
                "its context (-c)"
            )
        usable.sort(key=lambda n: -free[n])  # most free first; sort keeps name order on ties
        options = [option((n,), estimate_memory(model, args, (n,), free)) for n in usable]
        if len(usable) > 1:
            every = tuple(n for n in names if n in usable)
            options.append(option(every, estimate_memory(model, args, every, free)))
        return options

    async def _start(
        self,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        placement: Placement,
        began: float,
        evicted: int,
        machine: str = LOCAL,
    ) -> None:
        """Start ``key`` and wait until it serves; the ``loaded`` event carries the
        seconds since ``began`` (the load was taken up) and how many were evicted."""
        remote = self.remotes.get(machine)
        if remote is not None:
            await self._start_remote(remote, key, model, flags, placement, began, evicted)
            return
        lease = lease_port(self.settings.ports(), state_dir() / "ports")
        try:
            managed = self._managed(key, model, flags, lease, placement.devices)
        except Exception:
            lease.release()
            raise
        hosted = Hosted(
            key=key,
            model=model,
            flags=flags,
            managed=managed,
            url=f"{managed.scheme}://127.0.0.1:{lease.port}",
            estimate=placement.load.estimate,
            last_used=self.scheduler.clock(),
            devices=dict(placement.load.devices),
            placed=placement.devices,
        )
        self.running[key] = hosted
        self.loads += 1
        started = time.monotonic()
        log.info(
            "loading model=%s key=%s port=%d%s",
            model.id,
            key,
            lease.port,
            f" devices={','.join(placement.devices)}" if placement.devices else "",
        )
        self.scheduler.emit({"type": "model", "model": key, "event": "loading"})
        await managed.start()
        # the wait for readiness (up to startup_timeout) runs beside the load loop: a
        # slow or hanging start never holds up other models' loads
        self._beside(self._come_up(hosted, began, evicted, started), name=f"host-start-{key}")

    async def _start_remote(
        self,
        remote: RemoteMachine,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        placement: Placement,
        began: float,
        evicted: int,
    ) -> None:
        """Ask a remote model host to start ``key``; then wait as for a local start."""
        server = RemoteServer(
            remote, key, model.id, flags, placement.devices, self.settings.startup_timeout
        )
        hosted = Hosted(
            key=key,
            model=model,
            flags=flags,
            managed=server,  # type: ignore[arg-type]  # what the host uses of one
            url="",
            estimate=placement.load.estimate,
            last_used=self.scheduler.clock(),
            devices=dict(placement.load.devices),
            placed=placement.devices,
            machine=remote.id,
        )
        self.running[key] = hosted
        self.loads += 1
        started = time.monotonic()
        log.info("loading model=%s key=%s host=%s", model.id, key, remote.label)
        self.scheduler.emit(
            {"type": "model", "model": key, "event": "loading", "host": remote.label}
        )
        try:
            await server.start()
        except LoadRefused:
            if self.running.get(key) is hosted:
                del self.running[key]
            raise
        hosted.url = server.url
        self._beside(self._come_up(hosted, began, evicted, started), name=f"host-start-{key}")

    def _beside(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` beside the load loop (a start's wait, a replica's stop); the host's
        stop cancels it."""
        task = asyncio.create_task(work, name=name)
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _come_up(self, hosted: Hosted, began: float, evicted: int, started: float) -> None:
        """Wait until a started server serves; refuse its waiters if it never does."""
        try:
            await self._refusing(hosted.key, "start", self._ready(hosted, began, evicted, started))
        finally:
            self._wake.set()  # a load waiting for room may go on now

    async def _ready(self, hosted: Hosted, began: float, evicted: int, started: float) -> None:
        key, model, flags = hosted.key, hosted.model, hosted.flags
        managed = hosted.managed
        ready = await managed.supervisor.wait_ready()
        if self.running.get(key) is not hosted or hosted.state is not ModelState.LOADING:
            return  # unloaded while it started (an operator's unload, a reload)
        if not ready:
            error = managed.supervisor.last_error or "did not start"
            oom = managed.supervisor.out_of_memory
            del self.running[key]
            await managed.stop()
            short = error.split("; last log lines:", 1)[0].strip()
            shown = f"{model.id!r} with flags {' '.join(flags)}" if flags else repr(key)
            numbers = ""
            if oom is not None:
                numbers = self._out_of_memory(hosted, oom.device)
            raise LoadRefused(
                f"model {shown} failed to start: {short}{numbers}; its last log lines are "
                "in the management API (GET /api/v1/models, `error`) and corral's log",
                f"model {key!r} failed to start: {error}{numbers}",
            )

        # ready for the balancer once its agent has reported it usable (each report
        # is a scheduler change)
        def reported() -> bool:
            if self.running.get(key) is not hosted or hosted.state is not ModelState.LOADING:
                return True  # unloaded (or reloaded) while it came up
            instance = self._instance(hosted)
            return instance is not None and instance.usable(self.scheduler.clock())

        await self.scheduler.wait_until(reported, 10.0)
        if self.running.get(key) is not hosted or hosted.state is not ModelState.LOADING:
            return
        self._set_state(hosted, ModelState.LOADED)
        seconds = self.scheduler.clock() - began
        log.info(
            "loaded model=%s key=%s in %.2fs (swap %.2fs, evicted %d)",
            model.id,
            key,
            time.monotonic() - started,
            seconds,
            evicted,
        )
        self.scheduler.emit(
            {
                "type": "model",
                "model": key,
                "event": "loaded",
                "seconds": round(seconds, 6),
                "evicted": evicted,
            }
        )

    def _out_of_memory(self, hosted: Hosted, device: str | None) -> str:
        """Remember where ``hosted`` ran out of memory (not to be placed there again
        until the device has more free); the numbers for its error."""
        view = self.device_memory(hosted.model, hosted.machine)
        devices = [device] if device in view else list(hosted.devices)
        parts = []
        for name in devices:
            total, free = view.get(name, (0, 0))
            self.out_of_memory.setdefault(_oom_key(hosted.key, hosted.machine), {})[name] = free
            parts.append(
                f"corral estimated {format_bytes(hosted.devices.get(name, 0))} on {name}, "
                f"which has {format_bytes(free)} free of {format_bytes(total)}"
            )
        if not devices:
            parts.append(f"corral estimated {format_bytes(hosted.estimate)} of RAM")
        again = " (not tried on that device again until it has more free)" if devices else ""
        return "; " + "; ".join(parts) + again

    def _managed(
        self,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        lease: PortLease,
        devices: tuple[str, ...] = (),
    ) -> ManagedInstance:
        """The supervised server of ``key``: llama-server, or the model's command; on
        ``devices`` (``--device``) when corral placed it."""
        config = self._config(model)
        llama_args = self._args(model, flags) if config.cmd is None else []
        if devices and config.cmd is None:
            llama_args += ["--device", ",".join(devices)]
        env = dict(config.env)
        if "CUDA_DEVICE_ORDER" not in os.environ:
            env.setdefault("CUDA_DEVICE_ORDER", CUDA_DEVICE_ORDER)
        values = {}  # the command template's model-specific placeholders
        if model.path is not None:
            values["model_path"] = str(model.path)
        mmproj = config.mmproj or model.mmproj
        if mmproj is not None:
            values["mmproj"] = str(mmproj)
        return ManagedInstance(
            ManagedOptions(
                binary=self.options.binary,
                model=model.path,
                model_id=pool_of(key),  # a replica answers for its pool
                aliases=list(model.aliases) if not flags else [],
                port=lease.port,
                lease=lease,
                balancers=[self.options.balancer],
                cluster_token=self.options.cluster_token,
                tls=self.options.tls,
                llama_args=llama_args,
                poll_interval=0.5,
                supervisor=(
                    dataclasses.replace(
                        supervisor_options(self.settings), stop_grace=config.stop_grace
                    )
                    if config.stop_grace is not None
                    else supervisor_options(self.settings)
                ),
                log_dir=self.settings.log_dir,
                tls_files=self._tls_files(config),
                env=env,
                command=list(config.cmd) if config.cmd is not None else None,
                template_values=values,
                health_path=config.health_path,
                slots=config.slots,
            )
        )

    def _tls_files(self, config: ModelConfig) -> tuple[Path, Path] | None:
        """corral's own pair for a llama-server served over https (``llama_server_tls``);
        None for plain http and for command templates (another server's flags)."""
        cert, key = self.settings.tls_cert, self.settings.tls_key
        if not self.settings.llama_server_tls or config.cmd is not None or cert is None:
            return None
        assert key is not None
        return cert, key

    async def _unload(self, hosted: Hosted, reason: str) -> bool:
        """Drain (bounded), then stop; False (and serving again) if it did not drain."""
        if hosted.state is ModelState.UNLOADING:
            return False
        previous = hosted.state
        self._set_state(hosted, ModelState.UNLOADING)
        log.info("unloading key=%s reason=%s", hosted.key, reason)
        self.scheduler.emit({"type": "model", "model": hosted.key, "event": "unloading"})
        instance = self._instance(hosted)
        if instance is not None and not await self.scheduler.drain(
            instance, self.settings.drain_timeout
        ):
            log.warning("unload of key=%s called off: requests still in flight", hosted.key)
            self.scheduler.undrain(instance)
            self._set_state(hosted, previous)
            return False
        await hosted.managed.stop()
        if self.running.get(hosted.key) is hosted:
            del self.running[hosted.key]
        log.info("unloaded key=%s", hosted.key)
        self.scheduler.emit({"type": "model", "model": hosted.key, "event": "unloaded"})
        # requests that arrived while it drained are waiting: load it again for them
        pool = pool_of(hosted.key)
        if self.scheduler.buffered(pool) and not self._stopping and pool not in self.running:
            self.request(pool)
        return True

    def _set_state(self, hosted: Hosted, state: ModelState) -> None:
        hosted.state = state
        self._ttl_wake.set()  # a newly loaded instance may expire before the TTL task wakes

    async def _replica_loop(self) -> None:
        """Start and stop replicas as demand says (:func:`plan_replicas`): looked at on
        every scheduler change, and every :data:`REPLICA_CHECK` seconds at the latest."""
        while True:
            self._scale_replicas()
            await self.scheduler.next_change(REPLICA_CHECK)

    def _scale_replicas(self) -> None:
        now = self.scheduler.clock()
        for model in self.models():
            wanted = self._config(model).replicas
            if wanted is None or (wanted.max <= 1 and wanted.min == 0):
                continue
            pool = model.id
            if any(pool_of(k) == pool for k in self.pending) or (
                self.loading is not None and pool_of(self.loading) == pool
            ):
                continue  # one of its loads is under way
            replicas = [r for r in self.residents(None) if pool_of(r.key) == pool]
            scale = plan_replicas(
                replicas,
                minimum=wanted.min,
                maximum=wanted.max,
                waited=self.scheduler.waited(pool),
                free_slots=self.scheduler.free_slots(pool),
                now=now,
                wait_s=self.settings.replica_wait,
                idle_s=self.settings.replica_idle,
            )
            if scale.add and self._replica_room(pool):
                number = 1
                while replica_key(pool, number) in self.running:
                    number += 1
                key = replica_key(pool, number)
                log.info("another replica key=%s running=%d", key, len(replicas))
                self.explicit.add(key)
                self.request(key)
            for key in scale.remove:
                hosted = self.running.get(key)
                if hosted is not None:
                    self._beside(
                        self._unload(hosted, f"replica idle for {self.settings.replica_idle:g} s"),
                        name=f"host-replica-stop-{key}",
                    )

    def _replica_room(self, pool: str) -> bool:
        """Whether a machine that runs none of ``pool`` can start it."""
        spec = self._spec(pool)
        if spec is None:
            return False
        busy = {h.machine for h in self.running.values() if pool_of(h.key) == pool}
        return any(m not in busy for m in self.machines_for(spec[0].id))

    async def _ttl_loop(self) -> None:
        """Unload instances idle past their TTL; sleeps until the planner's next
        expiry, or until an instance changes state."""
        while True:
            now = self.scheduler.clock()
            residents = self.residents(None)
            for key in idle_expired(residents, now):
                hosted = self.running.get(key)
                if hosted is not None:
                    ttl = self._ttl(hosted.model)
                    await self._unload(hosted, f"idle for {ttl:g} s")
            wake = next_expiry(self.residents(None), self.scheduler.clock())
            self._ttl_wake.clear()
            if wake is None:
                await self._ttl_wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    timeout = max(0.0, wake - self.scheduler.clock()) + TTL_SLACK
                    await asyncio.wait_for(self._ttl_wake.wait(), timeout)


def _oom_key(key: str, machine: str) -> str:
    """Where :attr:`ModelHost.out_of_memory` keeps ``key``'s failures on ``machine``."""
    return key if machine == LOCAL else f"{key}@{machine}"


def _mtime(path: Path | None) -> int:
    try:
        return int(path.stat().st_mtime) if path is not None else 0
    except OSError:
        return 0
