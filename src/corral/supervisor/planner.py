"""What the model host decides, as pure functions of its state and a clock.

:class:`~corral.supervisor.host.ModelHost` acts (starts and stops servers, drains,
emits events, waits); these functions decide, from plain values it reads off its
instances and the scheduler, and never log, wait or touch a process, so every rule
here is unit-tested with made-up states and a made-up clock (llama-swap's router keeps
its ``Swapper`` the same way).

Making room for a load, in this order:

1. the load's exclusive group: its running members go first (they swap);
2. ``max_instances``: the least recently used instance goes, idle ones before busy
   ones, never one that is loading, never a member of a persistent group (unless the
   load is in that group);
3. memory: the load's estimate must fit in what is available plus what evicting
   frees (servers still starting count as taken); otherwise more instances go, or the
   load is refused with both numbers. Each GPU is a budget of its own: what the load
   puts on a device must fit in that device's free memory, and only instances on that
   device free any of it.

Where a load goes on a host with several GPUs is :func:`place`: of the devices (or
device sets) it could use, the one where it starts now with the most memory left, else
the one that needs the fewest evictions, so two models that each fit one GPU go to
different GPUs.

A victim still serving requests keeps serving them for up to ``swap_hold`` seconds
after the load was taken up (so alternating traffic swaps in batches), and the host
drains it before stopping it. An idle TTL unloads an instance that has had nothing in
flight, nothing waiting and no load queued for that long.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from corral.catalog.memory import format_bytes
from corral.hosting import ModelState


@dataclass(frozen=True)
class Resident:
    """One instance a host runs, as the planner sees it."""

    key: str
    state: ModelState
    estimate: int = 0
    """Bytes it is expected to take (weights + KV cache)."""
    last_used: float = 0.0
    """When a request last left it (or its load began), on the host's clock."""
    in_flight: int = 0
    waiting: int = 0
    """Requests buffered for it."""
    group: str | None = None
    persistent: bool = False
    """Its group is persistent: only a load in that same group may evict it."""
    ttl: float | None = None
    """Idle seconds before it is unloaded; None: never."""
    queued: bool = False
    """A load of it waits in the host's queue (a TTL must not unload it meanwhile)."""
    devices: Mapping[str, int] = field(default_factory=dict)
    """Bytes it is expected to take on each GPU (none: all in RAM)."""

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0


@dataclass(frozen=True)
class Load:
    """A load being planned: the model (pool) to start and what it needs."""

    key: str
    estimate: int = 0
    began: float = 0.0
    """When the host took it up: the swap hold counts from here."""
    group: str | None = None
    exclusive: bool = False
    devices: Mapping[str, int] = field(default_factory=dict)
    """Bytes it needs on each GPU it would use."""


@dataclass(frozen=True)
class Limits:
    max_instances: int
    swap_hold: float = 0.0
    memory_check: bool = True


@dataclass(frozen=True)
class Start:
    """It fits: start it now."""


@dataclass(frozen=True)
class Evict:
    """Unload these (drained first), then plan again."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """Nothing can be done yet: plan again at the next change, or at ``until`` (the
    host's clock) at the latest; ``until`` None: at the next change."""

    until: float | None = None


@dataclass(frozen=True)
class Refuse:
    """It can never fit as things are: its waiters get ``reason``."""

    reason: str


Plan = Start | Evict | Wait | Refuse


def plan_room(
    load: Load,
    residents: Sequence[Resident],
    limits: Limits,
    now: float,
    available: int | None = None,
    device_free: Mapping[str, int] | None = None,
) -> Plan:
    """What to do next for ``load``. ``available``: the machine's available memory in
    bytes (None when no memory check applies); ``device_free``: each GPU's free bytes
    (a device not in it is not checked)."""
    victims = _victims(load, residents, limits, available, device_free or {})
    if isinstance(victims, Wait | Refuse):
        return victims
    if not victims:
        return Start()
    hold_until = load.began + limits.swap_hold
    if any(v.busy for v in victims) and now < hold_until:
        # the running batch goes on (it still takes new requests) until it is idle or
        # the hold is over, so alternating traffic swaps in big batches
        return Wait(until=hold_until)
    return Evict(tuple(v.key for v in victims))


def _victims(
    load: Load,
    residents: Sequence[Resident],
    limits: Limits,
    available: int | None,
    device_free: Mapping[str, int],
) -> list[Resident] | Wait | Refuse:
    others = [r for r in residents if r.key != load.key]
    swap = load.exclusive and load.group is not None
    must = [r for r in others if swap and r.group == load.group]
    rest = [r for r in others if r not in must]

    def evictable(r: Resident) -> bool:
        return r.state is ModelState.LOADED and not (r.persistent and r.group != load.group)

    candidates = sorted((r for r in rest if evictable(r)), key=lambda r: (r.busy, r.last_used))
    if any(r.state is ModelState.LOADING for r in must):
        return Wait()  # a group member still starting: swap it out once it serves
    chosen = list(must)
    count = len(others) - len(chosen)
    while count + 1 > limits.max_instances and candidates:
        chosen.append(candidates.pop(0))
        count -= 1
    if count + 1 > limits.max_instances:
        if _settling(rest) or any(evictable(r) for r in rest):
            return Wait()
        return Refuse(
            f"cannot load {load.key!r}: {limits.max_instances} instances run (max_instances) "
            "and none may be evicted (persistent groups); unload one or raise max_instances"
        )
    if limits.memory_check:
        # one budget per kind of memory: RAM (RAM_BUDGET), and each GPU the load uses
        need = {RAM_BUDGET: load.estimate if available is not None else 0}
        need.update({d: b for d, b in load.devices.items() if d in device_free})
        need = {k: v for k, v in need.items() if v > 0}
        budgets = {RAM_BUDGET: available or 0, **device_free}
        # servers still starting may not have taken their memory yet: count it taken
        free = {
            k: budgets[k]
            - sum(_on(r, k) for r in others if r.state is ModelState.LOADING)
            + sum(_on(r, k) for r in chosen)
            for k in need
        }
        short = [k for k in need if need[k] > free[k]]
        while short:
            # the least recently used candidate that frees some of what is short
            victim = next((r for r in candidates if any(_on(r, k) for k in short)), None)
            if victim is None:
                break
            candidates.remove(victim)
            chosen.append(victim)
            for k in need:
                free[k] += _on(victim, k)
            short = [k for k in need if need[k] > free[k]]
        if short:
            if _settling(others):
                return Wait()  # memory may come back when those settle
            where = short[0]
            if where == RAM_BUDGET:
                return Refuse(
                    f"not enough memory to load {load.key!r}: it needs about "
                    f"{format_bytes(load.estimate)} (weights + KV cache) and "
                    f"{format_bytes(free[where])} is available even after evicting what "
                    "may be evicted; free memory, lower its context (-c) or set "
                    "memory_check: false"
                )
            return Refuse(
                f"not enough memory on {where} to load {load.key!r}: it needs about "
                f"{format_bytes(need[where])} there (its offloaded layers, KV cache and "
                f"compute buffers) and {format_bytes(free[where])} is free on it even "
                "after evicting what may be evicted; free the device, offload fewer "
                "layers (-ngl), lower its context (-c) or set memory_check: false"
            )
    if any(r.state is ModelState.UNLOADING for r in chosen):
        return Wait()
    return chosen


#: The name of the RAM budget among the GPUs' (no llama.cpp device is called this).
RAM_BUDGET = "RAM"


def _on(resident: Resident, budget: str) -> int:
    """What ``resident`` takes of ``budget``."""
    return resident.estimate if budget == RAM_BUDGET else resident.devices.get(budget, 0)


@dataclass(frozen=True)
class Placement:
    """One way to run a load: on these devices (``()``: as its arguments say, or the
    CPU), needing what ``load`` says there."""

    devices: tuple[str, ...]
    load: Load


def place(
    options: Sequence[Placement],
    residents: Sequence[Resident],
    limits: Limits,
    now: float,
    available: int | None = None,
    device_free: Mapping[str, int] | None = None,
) -> tuple[Placement, Plan]:
    """The placement to go with, and its plan. Of ``options`` (in the host's order of
    preference), the one that can start now with the most memory left on its devices;
    else the one that needs the fewest evictions; else, when one must wait, that one;
    else the first one's refusal. Ties keep the given order, so the choice is the same
    for the same state."""
    if not options:
        raise ValueError("place() needs at least one placement")
    free = device_free or {}
    starting = [
        r for r in residents if r.state is ModelState.LOADING and r.key != options[0].load.key
    ]
    planned = [
        (option, plan_room(option.load, residents, limits, now, available, free))
        for option in options
    ]

    def headroom(option: Placement) -> int:
        left = [
            free[d] - sum(r.devices.get(d, 0) for r in starting) - option.load.devices.get(d, 0)
            for d in option.devices
            if d in free
        ]
        return min(left, default=0)

    starts = [(o, p) for o, p in planned if isinstance(p, Start)]
    if starts:
        return max(starts, key=lambda op: headroom(op[0]))  # max keeps the first of ties
    evicts = [(o, p) for o, p in planned if isinstance(p, Evict)]
    if evicts:
        return min(evicts, key=lambda op: len(op[1].keys) if isinstance(op[1], Evict) else 0)
    waits = [(o, p) for o, p in planned if isinstance(p, Wait)]
    if waits:
        return waits[0]
    return planned[0]


@dataclass(frozen=True)
class Scale:
    """What to do with one model's replicas: start one more, and/or stop these."""

    add: bool = False
    remove: tuple[str, ...] = ()


def plan_replicas(
    replicas: Sequence[Resident],
    *,
    minimum: int,
    maximum: int,
    waited: float | None,
    free_slots: int,
    now: float,
    wait_s: float,
    idle_s: float,
) -> Scale:
    """One model's replicas (its instances on every host) against its ``replicas``
    setting: fewer than ``minimum`` running, or requests waiting ``wait_s`` or longer
    with no free slot and fewer than ``maximum``: start another (one at a time, not
    while one is still starting). More than ``minimum`` (or than ``maximum``): stop
    those idle for ``idle_s`` (nothing in flight or waiting), the newest first."""
    alive = [r for r in replicas if r.state is not ModelState.UNLOADING]
    starting = any(r.state is ModelState.LOADING for r in alive)
    count = len(alive)
    add = not starting and (
        count < minimum
        or (count < maximum and waited is not None and waited >= wait_s and free_slots == 0)
    )
    idle = [
        r
        for r in alive
        if r.state is ModelState.LOADED and not r.busy and now - r.last_used >= idle_s
    ]
    idle.sort(key=lambda r: r.key, reverse=True)  # replica keys count up: newest first
    keep = max(minimum, 0)
    spare = max(0, count - keep)
    if count > maximum:
        spare = max(spare, count - maximum)
    remove = tuple(r.key for r in idle[:spare]) if not add else ()
    return Scale(add=add, remove=remove)


def _settling(residents: Iterable[Resident]) -> bool:
    return any(r.state in (ModelState.LOADING, ModelState.UNLOADING) for r in residents)


def idle_expired(residents: Iterable[Resident], now: float) -> list[str]:
    """The loaded instances whose idle TTL is over: nothing in flight, nothing waiting,
    no load queued, and no request for ``ttl`` seconds."""
    return [
        r.key
        for r in residents
        if r.ttl is not None
        and r.state is ModelState.LOADED
        and not r.busy
        and not r.queued
        and now - r.last_used >= r.ttl
    ]


def next_expiry(residents: Iterable[Resident], now: float) -> float | None:
    """When an idle TTL may next be over (the host's clock), or None when no loaded
    instance has one. A busy instance cannot expire before ``ttl`` from now (its last
    use moves on when its requests end), so that is when it is looked at again."""
    times = [
        now + r.ttl if r.busy or r.queued else r.last_used + r.ttl
        for r in residents
        if r.ttl is not None and r.state is ModelState.LOADED
    ]
    return min(times, default=None)
