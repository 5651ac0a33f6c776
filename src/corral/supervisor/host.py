"""The model host: starts llama-servers on demand, within the machine's limits.

``corral serve`` runs one. A request for a model the catalog knows but no instance
serves makes the scheduler call :meth:`ModelHost.request`; the host queues a load and
the request waits in the buffer until the instance is ready. Loads are planned one at
a time (making room, then starting the process), so many concurrent requests for one
model cause one start, and each load sees the machine as the previous one left it;
the wait until a started server serves runs beside the next loads, so a slow or
hanging start never holds up other models (its memory estimate counts as taken, and
an exclusive group's member still starting is swapped out only once it serves).

Making room, in this order:

1. the load's exclusive group: its running members are unloaded first (they swap);
2. ``max_instances`` (4 unless set, like llama-server's router mode): the least
   recently used instance is unloaded, idle ones before busy ones, never one that is
   loading, never a member of a persistent group (unless the load is in that group);
3. memory: the model's estimate (file size + KV cache, see
   :func:`corral.catalog.memory.estimate_bytes`) must fit in what psutil says is
   available plus what evicting would free; otherwise more instances are evicted, or
   the load is refused with both numbers.

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

All of this runs on the balancer's event loop and reads the balancer's scheduler
directly: in-flight counts and buffers are exact there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corral.catalog.discovery import Catalog, CatalogModel
from corral.catalog.memory import available_bytes, estimate_bytes, format_bytes, total_bytes
from corral.config import ModelConfig, Settings
from corral.fleet.state import Instance
from corral.hosting import LoadRefused
from corral.scheduling.scheduler import NoCapacity, Scheduler, SchedulingError
from corral.supervisor.instance import supervisor_options
from corral.supervisor.managed import ManagedInstance, ManagedOptions
from corral.supervisor.process import PortLease, lease_port
from corral.tokens import state_dir

log = logging.getLogger(__name__)

#: Instances one host runs when ``max_instances`` is unset (router mode's --models-max).
DEFAULT_MAX_INSTANCES = 4

#: How often idle TTLs are checked.
TTL_CHECK_INTERVAL = 1.0

HostedState = Literal["loading", "loaded", "unloading"]


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
    state: HostedState = "loading"
    last_used: float = 0.0
    """Scheduler clock when its load began (requests update the fleet instance's)."""


@dataclass
class HostOptions:
    binary: Path | None
    """llama-server; None: none was found, only command-template models load."""
    balancer: str
    """Management address of the balancer the instances report to."""
    cluster_token: str


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
        self.total_memory = total_bytes
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._starting: set[asyncio.Task[None]] = set()
        """Started servers being waited for until they serve (see :meth:`_come_up`)."""
        self._stopping = False

    @property
    def max_instances(self) -> int:
        return self.settings.max_instances or DEFAULT_MAX_INSTANCES

    # -- Loader protocol (the scheduler's view) -------------------------------------------

    def resolve(self, name: str) -> str | None:
        if name in self._flags:
            return name
        model = self.catalog.get(name)
        return model.id if model is not None else None

    def listed(self) -> list[str]:
        return [m.id for m in self.catalog.models if not self._config(m).unlisted]

    def names(self) -> list[str]:
        names: list[str] = []
        for model in self.catalog.models:
            if not self._config(model).unlisted:
                names += [model.id, *model.aliases]
        return names

    def request(self, model: str) -> bool:
        """Queue a load of ``model`` unless an instance is up, coming or queued."""
        hosted = self.running.get(model)
        if hosted is not None and hosted.state != "unloading":
            return hosted.state == "loading"
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

    def load(self, model: str) -> str:
        """Load ``model`` (an id or alias) even with nobody waiting; its key."""
        key = self.resolve(model)
        if key is None:
            raise LoadRefused(f"unknown model {model!r}")
        self.explicit.add(key)
        self.request(key)
        return key

    async def wait_loaded(self, key: str, timeout: float) -> bool:  # noqa: ASYNC109
        """True once ``key`` serves; False when its load failed or after ``timeout``."""

        def loaded() -> bool:
            hosted = self.running.get(key)
            return hosted is not None and hosted.state == "loaded"

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
        for model in self.catalog.models:
            config = self._config(model)
            hosted = self.running.get(model.id)
            state: str
            if hosted is not None:
                state = hosted.state
                instance = self._instance(hosted)
                if state == "loading" and instance and instance.usable(self.scheduler.clock()):
                    state = "loaded"  # serving already; the load loop notes it a moment later
            elif model.id in self.pending or model.id == self.loading:
                state = "loading"
            else:
                state = "unloaded"
            rows.append(
                {
                    "id": model.id,
                    "aliases": list(model.aliases),
                    "state": state,
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
                }
            )
        return rows

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._load_loop(), name="host-loads"),
            asyncio.create_task(self._ttl_loop(), name="host-ttl"),
        ]
        for model in self.catalog.models:
            if self._config(model).preload:
                self.load(model.id)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._starting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(h.managed.stop() for h in list(self.running.values())), return_exceptions=True
        )
        self.running.clear()

    # -- internals: specs ---------------------------------------------------------------

    def _config(self, model: CatalogModel) -> ModelConfig:
        return model.config or ModelConfig(path=model.path, aliases=list(model.aliases))

    def _spec(self, key: str) -> tuple[CatalogModel, tuple[str, ...]] | None:
        if key in self._flags:
            model_id, flags = self._flags[key]
        else:
            model_id, flags = key, ()
        model = self.catalog.get(model_id)
        return (model, flags) if model is not None else None

    def _args(self, model: CatalogModel, flags: tuple[str, ...]) -> list[str]:
        """llama-server's arguments for ``model``; a command template's model: the
        template as written (llama_args and flags never apply to it)."""
        config = self._config(model)
        if config.cmd is not None:
            return list(config.cmd)
        args = [*self.settings.llama_args, *config.args]
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

    def _in_flight(self, hosted: Hosted) -> int:
        instance = self._instance(hosted)
        return instance.in_flight if instance is not None else 0

    def _last_used(self, hosted: Hosted) -> float:
        instance = self._instance(hosted)
        used = instance.last_used if instance is not None else 0.0
        return max(hosted.last_used, used)

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
        command = self._config(model).cmd is not None
        if model.path is None and not command:
            raise LoadRefused(f"model {model.id!r} has no file (set models.{model.id}.path)")
        if self.options.binary is None and not command:
            raise LoadRefused(
                f"model {model.id!r} needs llama-server, and none was found: install it "
                "(corral llama-server install), or set llama_server or LLAMA_SERVER"
            )
        existing = self.running.get(key)
        if existing is not None and existing.state != "unloading":
            return
        if command:
            # another server's memory use is unknown; a GGUF file's size is a floor
            estimate = estimate_bytes(model, []) if model.size_bytes else 0
        else:
            estimate = estimate_bytes(model, self._args(model, flags))
        began = time.monotonic()  # the swap: making room, then starting
        evicted = 0
        while True:
            if not self._wanted(key):
                log.info("load dropped key=%s: nobody is waiting any more", key)
                return
            victims = self._victims(model, key, estimate)
            if victims is None:
                # nothing can go yet (busy, loading or protected): wait for a change
                await self._wait_change(0.25)
                continue
            if not victims:
                break
            busy = [v for v in victims if self._in_flight(v) or self.scheduler.buffered(v.key)]
            if busy and time.monotonic() - began < self.settings.swap_hold:
                # let the running batch go on (it still takes new requests) until it is
                # idle or the hold is over, so alternating traffic swaps in big batches
                await self._wait_change(0.05)
                continue
            for victim in victims:
                evicted += await self._unload(victim, f"making room for {key}")
        self.last_error.pop(key, None)
        await self._start(key, model, flags, estimate, began, evicted)

    def _victims(self, model: CatalogModel, key: str, estimate: int) -> list[Hosted] | None:
        """Instances to unload so ``key`` fits: [] when it fits now, None when it would
        fit only after instances that cannot go yet do; raises when it never fits."""
        group, exclusive, _ = self._group(model)
        others = [h for h in self.running.values() if h.key != key]
        swap = exclusive and group is not None
        must = [h for h in others if swap and self._group(h.model)[0] == group]
        rest = [h for h in others if h not in must]

        def evictable(h: Hosted) -> bool:
            h_group, _, h_persistent = self._group(h.model)
            return h.state == "loaded" and not (h_persistent and h_group != group)

        candidates = sorted(
            (h for h in rest if evictable(h)),
            key=lambda h: (
                self._in_flight(h) > 0 or self.scheduler.buffered(h.key) > 0,
                self._last_used(h),
            ),
        )
        if any(h.state == "loading" for h in must):
            return None  # a group member still starting: swap it out once it serves
        chosen = list(must)
        count = len(others) - len(chosen)
        while count + 1 > self.max_instances and candidates:
            chosen.append(candidates.pop(0))
            count -= 1
        if count + 1 > self.max_instances:
            if any(h.state == "loading" or h.state == "unloading" for h in rest) or any(
                evictable(h) for h in rest
            ):
                return None
            raise LoadRefused(
                f"cannot load {key!r}: {self.max_instances} instances run (max_instances) and "
                "none may be evicted (persistent groups); unload one or raise max_instances"
            )
        if self.settings.memory_check and estimate:
            # servers still starting may not have taken their memory yet: count it taken
            starting = sum(h.estimate for h in others if h.state == "loading")
            free = self.memory() - starting + sum(h.estimate for h in chosen)
            while estimate > free and candidates:
                victim = candidates.pop(0)
                chosen.append(victim)
                free += victim.estimate
            if estimate > free:
                if any(h.state in ("loading", "unloading") for h in others):
                    return None  # memory may come back when those settle
                raise LoadRefused(
                    f"not enough memory to load {key!r}: it needs about "
                    f"{format_bytes(estimate)} (weights + KV cache) and "
                    f"{format_bytes(free)} is available even after evicting what may be "
                    "evicted; free memory, lower its context (-c) or set memory_check: false"
                )
        if any(h.state == "unloading" for h in chosen):
            return None
        return chosen

    async def _wait_change(self, seconds: float) -> None:
        """Until something changes (a release, a load or unload event, a report),
        ``seconds`` at most: the plan is made again then."""
        await self.scheduler.next_change(seconds)

    async def _start(
        self,
        key: str,
        model: CatalogModel,
        flags: tuple[str, ...],
        estimate: int,
        began: float,
        evicted: int,
    ) -> None:
        """Start ``key`` and wait until it serves; the ``loaded`` event carries the
        seconds since ``began`` (the load was taken up) and how many were evicted."""
        lease = lease_port(self.settings.ports(), state_dir() / "ports")
        try:
            managed = self._managed(key, model, flags, lease)
        except Exception:
            lease.release()
            raise
        hosted = Hosted(
            key=key,
            model=model,
            flags=flags,
            managed=managed,
            url=f"http://127.0.0.1:{lease.port}",
            estimate=estimate,
            last_used=self.scheduler.clock(),
        )
        self.running[key] = hosted
        self.loads += 1
        started = time.monotonic()
        log.info("loading model=%s key=%s port=%d", model.id, key, lease.port)
        self.scheduler.emit({"type": "model", "model": key, "event": "loading"})
        await managed.start()
        # the wait for readiness (up to startup_timeout) runs beside the load loop: a
        # slow or hanging start never holds up other models' loads
        task = asyncio.create_task(
            self._come_up(hosted, began, evicted, started), name=f"host-start-{key}"
        )
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
        if self.running.get(key) is not hosted or hosted.state != "loading":
            return  # unloaded while it started (an operator's unload, a reload)
        if not ready:
            error = managed.supervisor.last_error or "did not start"
            del self.running[key]
            await managed.stop()
            short = error.split("; last log lines:", 1)[0].strip()
            shown = f"{model.id!r} with flags {' '.join(flags)}" if flags else repr(key)
            raise LoadRefused(
                f"model {shown} failed to start: {short}; its last log lines are in the "
                "management API (GET /api/v1/models, `error`) and corral's log",
                f"model {key!r} failed to start: {error}",
            )

        # ready for the balancer once its agent has reported it usable (each report
        # is a scheduler change)
        def reported() -> bool:
            if self.running.get(key) is not hosted or hosted.state != "loading":
                return True  # unloaded (or reloaded) while it came up
            instance = self._instance(hosted)
            return instance is not None and instance.usable(self.scheduler.clock())

        await self.scheduler.wait_until(reported, 10.0)
        if self.running.get(key) is not hosted or hosted.state != "loading":
            return
        hosted.state = "loaded"
        seconds = time.monotonic() - began
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

    def _managed(
        self, key: str, model: CatalogModel, flags: tuple[str, ...], lease: PortLease
    ) -> ManagedInstance:
        """The supervised server of ``key``: llama-server, or the model's command."""
        config = self._config(model)
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
                model_id=key,
                aliases=list(model.aliases) if not flags else [],
                port=lease.port,
                lease=lease,
                balancers=[self.options.balancer],
                cluster_token=self.options.cluster_token,
                llama_args=self._args(model, flags) if config.cmd is None else [],
                poll_interval=0.5,
                supervisor=(
                    dataclasses.replace(
                        supervisor_options(self.settings), stop_grace=config.stop_grace
                    )
                    if config.stop_grace is not None
                    else supervisor_options(self.settings)
                ),
                log_dir=self.settings.log_dir,
                env=dict(config.env),
                command=list(config.cmd) if config.cmd is not None else None,
                template_values=values,
                health_path=config.health_path,
                slots=config.slots,
            )
        )

    async def _unload(self, hosted: Hosted, reason: str) -> bool:
        """Drain (bounded), then stop; False (and serving again) if it did not drain."""
        if hosted.state == "unloading":
            return False
        previous = hosted.state
        hosted.state = "unloading"
        log.info("unloading key=%s reason=%s", hosted.key, reason)
        self.scheduler.emit({"type": "model", "model": hosted.key, "event": "unloading"})
        instance = self._instance(hosted)
        if instance is not None and not await self.scheduler.drain(
            instance, self.settings.drain_timeout
        ):
            log.warning("unload of key=%s called off: requests still in flight", hosted.key)
            self.scheduler.undrain(instance)
            hosted.state = previous
            return False
        await hosted.managed.stop()
        if self.running.get(hosted.key) is hosted:
            del self.running[hosted.key]
        log.info("unloaded key=%s", hosted.key)
        self.scheduler.emit({"type": "model", "model": hosted.key, "event": "unloaded"})
        # requests that arrived while it drained are waiting: load it again for them
        if self.scheduler.buffered(hosted.key) and not self._stopping:
            self.request(hosted.key)
        return True

    async def _ttl_loop(self) -> None:
        while True:
            await asyncio.sleep(TTL_CHECK_INTERVAL)
            now = self.scheduler.clock()
            for hosted in list(self.running.values()):
                ttl = self._ttl(hosted.model)
                if ttl is None or hosted.state != "loaded":
                    continue
                if (
                    now - self._last_used(hosted) >= ttl
                    and self._in_flight(hosted) == 0
                    and not self.scheduler.buffered(hosted.key)
                    and hosted.key not in self.pending
                ):
                    await self._unload(hosted, f"idle for {ttl:g} s")


def _mtime(path: Path | None) -> int:
    try:
        return int(path.stat().st_mtime) if path is not None else 0
    except OSError:
        return 0
