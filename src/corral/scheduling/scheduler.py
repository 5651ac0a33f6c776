"""Admission, buffering and slot leases: the balancer's scheduler.

The scheduler owns the fleet picture and every waiting request. It runs on the
balancer's event loop and does no I/O: the gateway asks it for a :class:`Lease` (a
claimed slot on one instance) and gives the lease back when the response ends; the
control plane feeds it agent reports. Tests drive it directly, without processes.

Buffering: when no usable instance of a model has a free slot (or no instance exists
yet, so a fleet can scale from zero), a request waits in that model's FIFO buffer,
bounded in size (``max_buffered``; full -> 429 with ``Retry-After``) and in time
(``buffer_timeout``; -> 504). ``max_buffered == 0`` disables buffering (-> 503 at
once). A waiter whose client goes away is cancelled and leaves the buffer at once.
Waiters wake on every slot release, agent report and fleet change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from corral.fleet.state import (
    RELEASE_MEMORY,
    Agent,
    Breaker,
    Fleet,
    Instance,
    InstanceIssue,
    InstanceState,
)
from corral.protocol import InstanceReport
from corral.scheduling.policies import Placement, Policy, Served

if TYPE_CHECKING:
    from corral.scheduling.policies.base import WaitAdvice

log = logging.getLogger(__name__)

ANY_MODEL = ""  # buffer key for requests that name no model while none is served


class SchedulingError(Exception):
    """A request cannot be placed; carries the HTTP status and an OpenAI error type."""

    status = 503
    error_type = "unavailable_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class UnknownModel(SchedulingError):
    status = 404
    error_type = "not_found_error"


class UnknownInstance(SchedulingError):
    status = 404
    error_type = "not_found_error"


class ModelRequired(SchedulingError):
    status = 400
    error_type = "invalid_request_error"


class BufferFull(SchedulingError):
    status = 429
    error_type = "rate_limit_error"


class BufferTimeout(SchedulingError):
    status = 504
    error_type = "timeout_error"


class NoCapacity(SchedulingError):
    status = 503
    error_type = "unavailable_error"


class Loader(Protocol):
    """Starts instances on demand (``corral serve``'s model host): the scheduler asks it
    for models it knows but no instance serves, and lists them."""

    def resolve(self, name: str) -> str | None:
        """The model id a requested name or alias means, if the loader can serve it."""
        ...

    def listed(self) -> list[str]:
        """Model ids clients may ask for (unlisted ones left out)."""
        ...

    def names(self) -> list[str]:
        """The ids and aliases of the listed models: what a client may put in ``model``."""
        ...

    def request(self, model: str) -> bool:
        """A request for ``model`` is about to wait: start an instance if none is
        running or coming. True while one is being loaded (the wait may be longer)."""
        ...


@dataclass(eq=False)
class Lease:
    """One claimed slot: the request may be sent to ``instance`` until released."""

    instance: Instance
    model: str
    granted_at: float
    waited: float = 0.0
    released: bool = False
    probe: bool = False  # the one half-open probe of a tripped breaker
    slot: int | None = None
    """The slot the request is pinned to (``id_slot``), or None: llama-server picks."""
    slotless: bool = False
    """No slot was claimed (see :meth:`Scheduler.peek`): releasing it changes nothing."""
    reason: str | None = None
    """Why the policy chose this instance (:attr:`Policy.last_reason`), when it says."""
    outcome: str = "client_gone"
    """How the request ended, for :meth:`Scheduler.release` when the lease is used as
    a context manager: the holder sets ``ok`` or ``upstream_failed``; a lease left
    without a word (the client went away, an error) is released as ``client_gone``."""
    served: Served | None = None
    """What the response reported of its prompt, set by its holder: the release hands
    it to the policy (:meth:`Policy.record_cached`) before the slot is free again."""
    scheduler: Scheduler | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Give the slot back with :attr:`outcome`, however the block ended."""
        if self.scheduler is not None:
            self.scheduler.release(self, self.outcome)


@dataclass(eq=False)
class Waiter:
    model: str
    placement: Placement
    future: asyncio.Future[Lease]
    enqueued_at: float
    exclude: frozenset[str] = field(default_factory=frozenset)
    pinned: str | None = None
    """An instance this request waits for (its prompt is cached there), until
    ``pinned_until``; then it takes any free slot like every other waiter."""
    pinned_until: float = 0.0

    def held_for(self, now: float) -> bool:
        """Still waiting for its pinned instance only."""
        return self.pinned is not None and now < self.pinned_until


class Scheduler:
    """Places requests on instances by free slots and buffers what can't be placed."""

    def __init__(
        self,
        policy: Policy,
        *,
        max_buffered: int = 30,
        buffer_timeout: float = 10.0,
        report_timeout: float = 3.0,
        default_model: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = Fleet()
        self.default_model = default_model
        """Where a request goes that names no model, or one no model is called (with
        one model served, that model is the default)."""
        self.policy = policy
        self.max_buffered = max_buffered
        self.buffer_timeout = buffer_timeout
        self.report_timeout = report_timeout
        self.clock = clock
        self.buffers: dict[str, deque[Waiter]] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.accepting = True
        self._released = asyncio.Event()
        self._changed = asyncio.Event()
        self._watchers = 0
        self.loader: Loader | None = None
        """Starts instances for known models on demand; None: only agents add them."""
        self.load_allowance = 0.0
        """Extra seconds a request may wait while its model loads (startup and drain)."""

    # -- model resolution -------------------------------------------------------------

    def known_models(self) -> list[str]:
        """Models served now plus those the loader can start, sorted."""
        served = set(self.fleet.served_models())
        if self.loader is not None:
            served.update(self.loader.listed())
        return sorted(served)

    def askable_names(self) -> list[str]:
        """The names a client may ask for, sorted: ids and aliases of the models served
        and of those the loader can start. Pool names a client never chose (a model run
        with per-request flags, ``ID+DIGEST``) are left out."""
        names: set[str] = set()
        for instance in self.fleet.instances.values():
            if self.loader is not None and self.loader.resolve(instance.model) is not None:
                continue  # the loader's own: listed below by id and alias, unless unlisted
            names.update(name for name in instance.names if name)
        if self.loader is not None:
            names.update(self.loader.names())
        return sorted(names)

    def _named(self, name: str) -> str | None:
        """The pool ``name`` (an id, alias or alias pattern) refers to, or None."""
        if self.loader is not None:
            loadable = self.loader.resolve(name)
            if loadable is not None:
                return loadable
        return self.fleet.resolve(name)

    @property
    def learns(self) -> bool:
        """The policy learns from what responses report (see :class:`Served`)."""
        return self.policy.learns

    def resolve_model(self, requested: str | None) -> str:
        """The pool a request goes to, or an error a client can act on.

        Like llama-server, which answers whatever ``model`` a client sends with its one
        model, a name that is no model's id, alias or alias pattern goes to the default
        model: ``default_model`` when set, else the one model served. With several
        models and no default it is a 404 listing them (400 when no name is given).
        """
        if requested:
            named = self._named(requested)
            if named is not None:
                return named
        if self.default_model:
            return self._named(self.default_model) or self.default_model
        served = self.known_models()
        if len(served) == 1:
            return served[0]
        if not served and not requested:
            return ANY_MODEL  # scale from zero: any model that appears will do
        if requested and not self.fleet.instances and not self.fleet.known_models:
            return requested  # nothing registered yet: wait for it (scale from zero)
        if not requested:
            raise ModelRequired(
                "this server serves several models; set `model` to one of: "
                + ", ".join(self.askable_names())
            )
        askable = self.askable_names()
        listed = ", ".join(askable) if askable else "(none ready right now)"
        raise UnknownModel(f"model {requested!r} is not served here; models: {listed}")

    # -- leases -----------------------------------------------------------------------

    def _pool(self, model: str) -> list[Instance]:
        """The instances of ``model``; every instance for a request that names none."""
        return list(self.fleet.instances.values()) if model == ANY_MODEL else self.fleet.pool(model)

    def _candidates(self, model: str, exclude: frozenset[str]) -> list[Instance]:
        now = self.clock()
        pool = self._pool(model)
        if exclude and any(i.id not in exclude for i in pool):
            pool = [i for i in pool if i.id not in exclude]
        return [i for i in pool if i.free_slots > 0 and i.usable(now)]

    def try_lease(
        self, model: str, placement: Placement, exclude: frozenset[str] = frozenset()
    ) -> Lease | None:
        """Claim a slot now if one is free, else None."""
        return self._grant(
            self.policy.choose(self._candidates(model, exclude), placement), placement
        )

    def peek(
        self, model: str, exclude: frozenset[str] = frozenset(), instance: str | None = None
    ) -> Lease | None:
        """A slotless lease on a ready instance of ``model``, busy or not, or None.

        For requests llama-server answers without a slot (``/props``, ``/tokenize``,
        ``/metrics``, the web UI's files, slot actions): like llama-server itself, corral
        answers them at once while every slot is busy. Nothing is counted: the instance's
        slots, its idle time and its breaker stay as they were. ``instance``: that
        instance only (its slots are the ones a slot action means).
        """
        now = self.clock()
        pool = self._pool(model)
        ready = [i for i in pool if i.id not in exclude and i.usable(now)]
        if instance is not None:
            ready = [i for i in ready if i.id == instance]
        if not ready:
            return None
        chosen = min(ready, key=lambda i: (i.in_flight + i.foreign_busy, i.id))
        return Lease(
            instance=chosen, model=chosen.model, granted_at=now, slotless=True, scheduler=self
        )

    def _lease_pinned(self, waiter: Waiter) -> Lease | None:
        """A slot on the instance ``waiter`` waits for, if one is free now."""
        instance = self.fleet.instances.get(waiter.pinned or "")
        if instance is None or not instance.usable(self.clock()):
            waiter.pinned = None  # gone or out of service: wait no longer for it
            return None
        if instance.free_slots <= 0:
            return None
        return self._grant(self.policy.choose([instance], waiter.placement), waiter.placement)

    def _wait_advice(
        self, model: str, placement: Placement, exclude: frozenset[str]
    ) -> WaitAdvice | None:
        """The policy's advice to hold a request for its cached, busy instance (see
        :meth:`corral.scheduling.policies.prefix.PrefixPolicy.wait_advice`)."""
        if not self.policy.advises_waits or exclude or model == ANY_MODEL:
            return None
        if self.max_buffered == 0:
            return None
        now = self.clock()
        pool = [i for i in self.fleet.pool(model) if i.usable(now)]
        if len(pool) < 2 or not any(i.free_slots > 0 for i in pool):
            return None  # no choice to make, or it would wait anyway
        return self.policy.wait_advice(pool, placement)

    def _count(self, reason: str) -> None:
        self.policy.decisions[reason] += 1

    def _grant(self, chosen: Instance | None, placement: Placement) -> Lease | None:
        if chosen is None:
            return None
        slot = self.policy.choose_slot(chosen, placement)
        if slot is None:
            chosen.unpinned += 1
        else:
            chosen.pinned_slots.add(slot)
        chosen.in_flight += 1
        chosen.served += 1
        chosen.last_used = self.clock()
        probe = bool(chosen.breaker.failures)
        if probe:
            chosen.breaker.probing = True  # this request is the half-open probe
        return Lease(
            instance=chosen,
            model=chosen.model,
            granted_at=self.clock(),
            probe=probe,
            slot=slot,
            reason=self.policy.last_reason,
            scheduler=self,
        )

    def buffered(self, model: str | None = None) -> int:
        if model is not None:
            return sum(1 for w in self.buffers.get(model, ()) if not w.future.done())
        return sum(self.buffered(m) for m in self.buffers)

    async def acquire(
        self,
        model: str,
        placement: Placement,
        exclude: frozenset[str] = frozenset(),
        timeout: float | None = None,  # noqa: ASYNC109 (bounds the buffer wait: BufferTimeout)
    ) -> Lease:
        """A lease on an instance of ``model``, waiting in the buffer if needed.

        Raises :class:`BufferFull`, :class:`BufferTimeout` or :class:`NoCapacity`.
        Cancelling the caller (client gone) removes it from the buffer at once.
        """
        if not self.accepting:
            raise NoCapacity("corral is shutting down; retry on another balancer")
        queue = self.buffers.setdefault(model, deque())
        now = self.clock()
        advice = self._wait_advice(model, placement, exclude)
        if advice is not None and self.buffered(model) >= self.max_buffered:
            advice = None  # no room to wait: place it now like any other
        if advice is None and not any(not w.future.done() and not w.held_for(now) for w in queue):
            lease = self.try_lease(model, placement, exclude)
            if lease is not None:
                return lease
        pool = self.fleet.pool(model) if model != ANY_MODEL else []
        loading = False
        if self.loader is not None and model != ANY_MODEL:
            loading = self.loader.request(model)
        if pool and all(i.given_up for i in pool):
            # every instance has given up restarting: waiting would only time out
            reasons = "; ".join(f"{i.id}: {i.failure_reason()}" for i in pool)
            raise NoCapacity(
                f"model {model!r} is unavailable: its server failed and is not being "
                f"restarted ({reasons}); fix it and restart it through the management API"
            )
        if self.max_buffered == 0:
            raise NoCapacity(
                f"no free slot for model {model or '(any)'!r} and buffering is off; retry shortly",
                {"Retry-After": "1"},
            )
        self._prune(queue)
        if len(queue) >= self.max_buffered:
            raise BufferFull(
                f"all slots for model {model or '(any)'!r} are busy and its buffer is full "
                f"({self.max_buffered} waiting); retry later",
                {"Retry-After": str(max(1, math.ceil(self.buffer_timeout / 4)))},
            )
        loop = asyncio.get_running_loop()
        waiter = Waiter(model, placement, loop.create_future(), self.clock(), exclude)
        if advice is not None:
            waiter.pinned = advice.instance_id
            waiter.pinned_until = waiter.enqueued_at + advice.max_wait_s
            loop.call_later(advice.max_wait_s, self.wake, (model,))  # then: any slot
            self._count("wait_for_cache")
        queue.append(waiter)
        self._emit({"type": "buffer", "model": model, "depth": self.buffered(model)})
        # Waiters ahead may be ones that exclude an instance with a free slot (retries):
        # let this one take it now rather than at the next release or report.
        self.wake((model,))
        wait = self.buffer_timeout if timeout is None else timeout
        if loading:
            wait += self.load_allowance
        try:
            async with asyncio.timeout(wait):
                lease = await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                lease = waiter.future.result()  # granted as the timeout fired: use it
            else:
                raise BufferTimeout(
                    f"no slot for model {model or '(any)'!r} became free within {wait:g} s; "
                    "retry later or add capacity"
                ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result(), outcome="client_gone")
            raise
        finally:
            waiter.future.cancel()  # no-op when it has a result
            self._prune(queue)
            self._emit({"type": "buffer", "model": model, "depth": self.buffered(model)})
        lease.waited = self.clock() - waiter.enqueued_at
        return lease

    def waited(self, model: str) -> float | None:
        """Seconds the oldest request still waiting for ``model`` has waited (None: none
        waits): the demand signal for another replica."""
        since = [w.enqueued_at for w in self.buffers.get(model, ()) if not w.future.done()]
        return self.clock() - min(since) if since else None

    def free_slots(self, model: str) -> int:
        """Free slots on the usable instances of ``model``."""
        now = self.clock()
        return sum(i.free_slots for i in self.fleet.pool(model) if i.usable(now))

    def fail_waiters(self, model: str, error: SchedulingError) -> int:
        """End every request waiting for ``model`` with ``error``; how many there were."""
        failed = 0
        for waiter in self.buffers.get(model, ()):
            if not waiter.future.done():
                waiter.future.set_exception(error)
                failed += 1
        return failed

    async def drain(self, instance: Instance, limit_s: float) -> bool:
        """Stop placing requests on ``instance`` and wait (at most ``limit_s``) until its
        in-flight ones have finished; False when some were still running."""
        instance.start_draining()
        self._emit({"type": "instance", "instance": instance.id, "event": "draining"})
        try:
            async with asyncio.timeout(limit_s):
                while instance.in_flight > 0:
                    await self.wait_release()
        except TimeoutError:
            log.warning("drain timed out instance=%s in_flight=%d", instance.id, instance.in_flight)
            return False
        return True

    def undrain(self, instance: Instance) -> None:
        """Call a drain off: the instance takes requests again (waiters get it at once)."""
        instance.draining = False
        self.wake(instance.names)

    async def wait_release(self) -> None:
        """Return after the next slot release (used to wait for a drain)."""
        await self._released.wait()

    def emit(self, event: dict[str, Any]) -> None:
        """Tell every listener (event streams, dashboards) about a fleet event."""
        self._emit(event)

    def release(self, lease: Lease, outcome: str = "ok") -> None:
        """Give a slot back. ``outcome``: ``ok``, ``client_gone`` or ``upstream_failed``."""
        if lease.released:
            return
        lease.released = True
        served = lease.served
        if served is not None:  # learn before the slot is anyone's again
            self.policy.record_cached(
                lease.instance.id,
                served.placement.model,
                served.placement.body,
                served.cached_tokens,
                served.prompt_tokens,
                prompt_seconds=served.prompt_seconds,
                total_seconds=served.total_seconds,
            )
        if lease.slotless:
            return
        instance = lease.instance
        instance.in_flight = max(0, instance.in_flight - 1)
        if lease.slot is None:
            instance.unpinned = max(0, instance.unpinned - 1)
        elif outcome == "client_gone":
            # llama-server may still be generating for the client that left; a request
            # pinned to that slot would wait inside it. Keep the slot out of pins until
            # the agent's reports can show it busy (then nothing is pinned there at all).
            asyncio.get_running_loop().call_later(
                RELEASE_MEMORY, instance.pinned_slots.discard, lease.slot
            )
        else:
            instance.pinned_slots.discard(lease.slot)
        instance.note_release(self.clock())
        instance.last_used = self.clock()
        if outcome == "upstream_failed":
            instance.breaker.record_failure(self.clock())
            self._emit({"type": "breaker", "instance": instance.id, "state": "open"})
        elif outcome == "ok" and instance.breaker.failures:
            instance.breaker.record_success()
        elif lease.probe:
            instance.breaker.probing = False  # the probe told nothing: another may go
        released, self._released = self._released, asyncio.Event()
        released.set()
        self.wake(instance.names)

    # -- waking -----------------------------------------------------------------------

    @staticmethod
    def _prune(queue: deque[Waiter]) -> None:
        while queue and queue[0].future.done():
            queue.popleft()
        if any(w.future.done() for w in queue):
            live = [w for w in queue if not w.future.done()]
            queue.clear()
            queue.extend(live)

    async def wait_until(self, predicate: Callable[[], bool], limit_s: float) -> bool:
        """Wait until ``predicate()`` holds, re-checked at every change of the fleet
        (a report, a release, a drain, an event); False after ``limit_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.next_change(left)
        return True

    async def next_change(self, limit_s: float) -> None:
        """Return at the next change of the fleet (a report, a release, a drain, an
        event), or after ``limit_s``."""
        changed = self._changed
        self._watchers += 1
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 a wait_for cancelled as its
            # inner wait ends can hang its canceller
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit_s):
                    await changed.wait()
        finally:
            self._watchers -= 1

    def _notify(self) -> None:
        """Wake :meth:`wait_until` callers: something may have changed (free when
        nobody waits: this runs at every release)."""
        if self._watchers:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def wake(self, models: Iterable[str] | None = None) -> None:
        """Hand free slots to waiters, oldest first, for the given models (or all)."""
        self._notify()
        keys = list(self.buffers) if models is None else [*models, ANY_MODEL]
        for key in keys:
            queue = self.buffers.get(key)
            if not queue:
                continue
            self._prune(queue)
            now = self.clock()
            for waiter in list(queue):
                if waiter.future.done():
                    continue
                if waiter.pinned is not None:
                    if waiter.held_for(now):
                        lease = self._lease_pinned(waiter)
                        if lease is not None:
                            waiter.future.set_result(lease)
                        if waiter.pinned is not None:
                            continue  # it never holds up the waiters behind it
                    else:
                        waiter.pinned = None
                        self._count("wait_expired")
                lease = self.try_lease(waiter.model, waiter.placement, waiter.exclude)
                if lease is None:
                    if not waiter.exclude:
                        break  # the same candidates for every plain waiter behind it
                    continue
                waiter.future.set_result(lease)
            self._prune(queue)

    # -- fleet updates from agents ------------------------------------------------------

    def register_agent(self, agent_id: str, name: str, remote: str = "") -> Agent:
        agent = self.fleet.agents.get(agent_id)
        if agent is None:
            agent = Agent(id=agent_id, name=name, remote=remote)
            self.fleet.agents[agent_id] = agent
            self._emit({"type": "agent", "agent": agent_id, "event": "connected"})
        agent.last_report = self.clock()
        return agent

    def apply_snapshot(self, agent_id: str, seq: int, instances: Sequence[InstanceReport]) -> bool:
        """Apply an agent's snapshot; drop it (return False) when it is stale."""
        agent = self.fleet.agents.get(agent_id)
        if agent is None:
            return False
        if seq <= agent.last_seq:
            return False
        agent.last_seq = seq
        now = self.clock()
        agent.last_report = now
        seen: set[str] = set()
        changed = False
        for report in instances:
            instance_id = f"{agent_id}/{report.id}"
            seen.add(instance_id)
            instance = self.fleet.instances.get(instance_id)
            model = report.model
            if instance is None or instance.url != report.url or instance.model != model:
                if instance is not None:
                    self.fleet.remove_instance(instance_id)
                instance = Instance(id=instance_id, agent_id=agent_id, url=report.url, model=model)
                changed = True
            before = (instance.state, instance.total_slots, len(instance.issues), instance.stale)
            instance.aliases = [a for a in report.aliases if a != model]
            instance.state = InstanceState(report.state)
            if instance.draining and (
                instance.state is not InstanceState.READY or instance.pid != instance.drain_pid
            ):
                # the restart began (or is already done: a new process): the state
                # keeps it out until it is ready
                instance.draining = False
            if before[0] is not InstanceState.READY and instance.state is InstanceState.READY:
                instance.breaker = Breaker()  # a (re)started server gets a clean slate
                # its KV cache is empty: forget what it held
                self.policy.forget_instance(instance.id)
            instance.n_ctx = report.n_ctx
            if report.supervisor is not None:
                instance.supervisor = report.supervisor
            instance.slot_source = report.slot_source
            instance.sleeping = report.sleeping
            instance.issues = [InstanceIssue(i.kind, i.message) for i in report.issues]
            instance.apply_report(report.total_slots, report.busy, now)
            instance.last_report = now
            instance.stale = False
            self.fleet.upsert_instance(instance)
            agent.instance_ids.add(instance_id)
            after = (instance.state, instance.total_slots, len(instance.issues), instance.stale)
            changed = changed or before != after
        for gone in agent.instance_ids - seen:
            self.fleet.remove_instance(gone)
            changed = True
        if changed:
            self._emit({"type": "fleet", "agent": agent_id})
        self.wake()
        return True

    def agent_gone(self, agent_id: str) -> None:
        """An agent disconnected or deregistered: its instances leave their pools."""
        agent = self.fleet.agents.pop(agent_id, None)
        if agent is None:
            return
        for instance_id in list(agent.instance_ids):
            self.fleet.remove_instance(instance_id)
        self._emit({"type": "agent", "agent": agent_id, "event": "disconnected"})
        self.wake()

    def check_stale(self) -> None:
        """Take instances out of their pools when their agent missed reports too long."""
        now = self.clock()
        changed = False
        for agent in list(self.fleet.agents.values()):
            if now - agent.last_report > self.report_timeout:
                for instance_id in agent.instance_ids:
                    instance = self.fleet.instances.get(instance_id)
                    if instance is not None and not instance.stale:
                        instance.stale = True
                        changed = True
        if changed:
            self._emit({"type": "fleet", "event": "stale"})
        self.wake()

    # -- events ---------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        self._notify()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break scheduling
                log.exception("event listener failed")
