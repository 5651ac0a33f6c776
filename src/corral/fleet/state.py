"""The balancer's picture of the fleet: agents, instances, and per-model pools.

Everything here lives on the balancer's event loop and is changed only there. Slot
accounting joins two views of an instance: the requests this balancer has dispatched
and not yet finished (``in_flight``, exact and immediate) and the busy slots its agent
last reported (``reported_busy``, true but late, and counting other balancers' and
direct clients' work too). On each report the balancer keeps only the part it cannot
explain by its own work, ``foreign_busy = max(0, reported_busy - in_flight)``; its own
dispatches and releases then adjust the estimate at once, so a finished request frees
its slot without waiting for the next report, and nothing is counted twice.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from corral.catalog.names import pattern_matches
from corral.protocol import SupervisorReport

#: Seconds a slot release keeps explaining a busy slot in agents' reports: about the
#: time from an agent reading ``/slots`` to the balancer applying it.
RELEASE_MEMORY = 1.5


class InstanceState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class InstanceIssue:
    """A typed problem an agent found reading its llama-server."""

    kind: str  # unreachable | unauthorized | server_error | bad_response | loading | ...
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass
class Breaker:
    """Circuit breaker: set an instance aside after upstream failures, probe it later.

    Closed: traffic flows. Open: no traffic until ``open_until``. Then half-open: one
    request may probe it; success closes, failure opens again for twice as long.
    """

    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    base_cooldown: float = 2.0
    max_cooldown: float = 30.0

    def allows(self, now: float) -> bool:
        if self.failures == 0:
            return True
        if now < self.open_until:
            return False
        return not self.probing

    def record_failure(self, now: float) -> None:
        self.failures += 1
        self.probing = False
        cooldown = min(self.base_cooldown * 2 ** (self.failures - 1), self.max_cooldown)
        self.open_until = now + cooldown

    def record_success(self) -> None:
        self.failures = 0
        self.probing = False
        self.open_until = 0.0

    @property
    def state(self) -> str:
        if self.failures == 0:
            return "closed"
        return "half-open" if time.monotonic() >= self.open_until else "open"


@dataclass
class Instance:
    """One llama-server serving one model at one address, as the balancer sees it."""

    id: str
    agent_id: str
    url: str
    model: str
    aliases: list[str] = field(default_factory=list)
    state: InstanceState = InstanceState.STARTING
    total_slots: int = 0
    reported_busy: int = 0
    foreign_busy: int = 0
    in_flight: int = 0
    n_ctx: int = 0
    issues: list[InstanceIssue] = field(default_factory=list)
    recent_releases: deque[float] = field(default_factory=deque)
    last_report: float = 0.0
    stale: bool = False
    draining: bool = False
    """Set by this balancer before a restart: no new requests, in-flight ones finish."""
    drain_pid: int | None = None
    """The supervised process's pid when draining began (a new pid: it restarted)."""
    breaker: Breaker = field(default_factory=Breaker)
    served: int = 0
    slot_source: str = "slots"
    """Where the agent's busy count comes from: ``slots``, ``metrics`` or ``balancer``
    (a ``--no-slots`` server without ``--metrics``: only this balancer's own requests
    are counted; see :func:`corral.agent.instance_from_readings`)."""
    sleeping: bool = False
    """llama-server unloaded its model for ``--sleep-idle-seconds``; the next request
    wakes it, so the instance stays usable."""
    pinned_slots: set[int] = field(default_factory=set)
    """Slots this balancer's requests in flight were pinned to (``id_slot``)."""
    unpinned: int = 0
    """This balancer's requests in flight here without a pin (llama-server chose)."""
    last_used: float = 0.0
    """Scheduler clock when a request last started or ended here (LRU, idle TTL)."""
    started_at: float = field(default_factory=time.time)
    supervisor: SupervisorReport | None = None
    """Its supervising agent's view of the process (None when the agent only watches)."""

    @property
    def names(self) -> list[str]:
        return [self.model, *self.aliases]

    @property
    def busy_slots(self) -> int:
        return min(self.total_slots, self.in_flight + self.foreign_busy)

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - self.in_flight - self.foreign_busy)

    def usable(self, now: float) -> bool:
        """Ready, reported recently, no open issue, and not set aside by its breaker."""
        return (
            self.state is InstanceState.READY
            and not self.draining
            and not self.stale
            and not self.issues
            and self.total_slots > 0
            and self.breaker.allows(now)
        )

    @property
    def pid(self) -> int | None:
        """The supervised process's pid, when a supervisor reports one."""
        return self.supervisor.pid if self.supervisor is not None else None

    def start_draining(self) -> None:
        self.draining = True
        self.drain_pid = self.pid

    @property
    def given_up(self) -> bool:
        """Its supervisor stopped restarting it (``failed``): only an operator helps."""
        return self.supervisor is not None and self.supervisor.state == "failed"

    def failure_reason(self) -> str:
        error = (self.supervisor.last_error if self.supervisor is not None else None) or ""
        if not error and self.issues:
            error = self.issues[-1].message
        lines = [line for line in error.splitlines() if line.strip()]
        if not lines:
            return "no reason reported"
        if len(lines) == 1:
            return lines[0]
        return f"{lines[0].rstrip(':')} ... {lines[-1].strip()}"  # what and the last log line

    def note_release(self, now: float) -> None:
        """Remember a slot this balancer just gave back (see :meth:`apply_report`)."""
        self.recent_releases.append(now)

    def apply_report(self, total_slots: int, busy: int, now: float | None = None) -> None:
        """Take an agent's slot count. Busy slots this balancer can explain are not
        foreign: its requests in flight, and those it released within the last
        ``RELEASE_MEMORY`` seconds (a report read before a release may arrive after
        it; counting those as other clients' work would leave slots idle)."""
        self.total_slots = total_slots
        self.reported_busy = busy
        recent = 0
        if now is not None:
            while self.recent_releases and now - self.recent_releases[0] > RELEASE_MEMORY:
                self.recent_releases.popleft()
            recent = len(self.recent_releases)
        self.foreign_busy = max(0, busy - self.in_flight - recent)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "url": self.url,
            "model": self.model,
            "aliases": self.aliases,
            "state": self.state.value,
            "usable": self.usable(time.monotonic()),
            "stale": self.stale,
            "draining": self.draining,
            "slots_total": self.total_slots,
            "slots_busy": self.busy_slots,
            "slots_free": self.free_slots,
            "reported_busy": self.reported_busy,
            "slot_source": self.slot_source,
            "sleeping": self.sleeping,
            "in_flight": self.in_flight,
            "n_ctx": self.n_ctx,
            "issues": [i.as_dict() for i in self.issues],
            "breaker": self.breaker.state,
            "served": self.served,
            "seen_since": self.started_at,
            **({"supervisor": self.supervisor.to_wire()} if self.supervisor is not None else {}),
        }


@dataclass
class Agent:
    id: str
    name: str
    connected_at: float = field(default_factory=time.time)
    last_seq: int = -1
    last_report: float = field(default_factory=time.monotonic)
    instance_ids: set[str] = field(default_factory=set)
    remote: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "remote": self.remote,
            "connected_at": self.connected_at,
            "last_seq": self.last_seq,
            "instances": sorted(self.instance_ids),
        }


class Fleet:
    """Agents and instances by id, and the pool (instances) of each model name."""

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.instances: dict[str, Instance] = {}
        self.known_models: set[str] = set()

    def pool(self, model: str) -> list[Instance]:
        return [i for i in self.instances.values() if model in i.names]

    def served_models(self) -> list[str]:
        """Primary model names with at least one instance, sorted."""
        return sorted({i.model for i in self.instances.values() if i.model})

    def resolve(self, name: str) -> str | None:
        """The primary model name a requested name (or alias) refers to."""
        for instance in self.instances.values():
            if name in instance.names:
                return instance.model
        if name in self.known_models:
            return name
        for instance in sorted(self.instances.values(), key=lambda i: i.id):
            if pattern_matches(name, instance.aliases):
                return instance.model
        return None

    def upsert_instance(self, instance: Instance) -> None:
        self.instances[instance.id] = instance
        self.known_models.update(name for name in instance.names if name)

    def remove_instance(self, instance_id: str) -> Instance | None:
        instance = self.instances.pop(instance_id, None)
        if instance is not None:
            agent = self.agents.get(instance.agent_id)
            if agent is not None:
                agent.instance_ids.discard(instance_id)
        return instance
