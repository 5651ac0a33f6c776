"""What the agent and the balancer share on the wire (the bottom layer: it imports
nothing of corral's).

The agent protocol's frames are described in :mod:`corral.control.management`, which
serves them; this module holds what both sides must agree on so neither imports the
other: the socket's path, :class:`InstanceReport` (one instance of a ``snapshot``) and
:class:`SupervisorReport` (a supervising agent's view of the process). The agent
builds each instance it reports as an :class:`InstanceReport` and writes its
:meth:`~InstanceReport.to_wire`; the balancer reads it back with
:meth:`~InstanceReport.from_wire`, which checks every field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AGENT_SOCKET_PATH = "/api/v1/agents/socket"
"""The balancer's management route an agent opens its WebSocket on."""


class ProtocolError(ValueError):
    """A message that is not what the agent protocol says; the text says what is wrong."""


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ProtocolError(f"`{key}` must be a non-negative number, got {value!r}")
    return int(value)


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"`{key}` must be an integer or null, got {value!r}")
    return value


def _opt_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"`{key}` must be a number or null, got {value!r}")
    return float(value)


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ProtocolError(f"`{key}` must be a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class DeviceReport:
    """An accelerator llama-server's build can use, as its ``--list-devices`` says:
    ``name`` (``CUDA0``, ``Vulkan0``...), ``description``, memory in MiB."""

    name: str
    description: str = ""
    total_mib: int = 0
    free_mib: int = 0

    @classmethod
    def from_wire(cls, data: object) -> DeviceReport:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"a device must be an object, got {type(data).__name__}")
        return cls(
            name=_str(data, "name", ""),
            description=_str(data, "description", ""),
            total_mib=_int(data, "total_mib"),
            free_mib=_int(data, "free_mib"),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "total_mib": self.total_mib,
            "free_mib": self.free_mib,
        }


@dataclass(frozen=True)
class SupervisorReport:
    """A supervising agent's view of its llama-server process.

    ``state`` is the supervisor's (``starting``, ``ready``, ``failed``: it gave up
    restarting, ``stopped``); the counters only grow while one supervisor runs, so the
    balancer counts launches, restarts, failed runs and readies from their increase
    (a drop means a new supervisor behind the same id).
    """

    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0
    launches: int = 0
    failed_runs: int = 0
    readies: int = 0
    startup_seconds: tuple[float, ...] = ()
    """Seconds from launch to ready, for each of the last readies."""
    last_exit_code: int | None = None
    last_error: str | None = None
    ready_since: float | None = None
    log_tail: tuple[str, ...] = ()
    """The process's last output lines."""
    devices: tuple[DeviceReport, ...] = ()
    """The accelerators its binary can use (empty: the CPU only, or not known)."""

    @classmethod
    def from_wire(cls, data: object) -> SupervisorReport:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"`supervisor` must be an object, got {type(data).__name__}")
        seconds = _list(data, "startup_seconds")
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in seconds):
            raise ProtocolError("`startup_seconds` must be a list of numbers")
        error = data.get("last_error")
        return cls(
            state=_str(data, "state", "stopped"),
            pid=_opt_int(data, "pid"),
            restarts=_int(data, "restarts"),
            launches=_int(data, "launches"),
            failed_runs=_int(data, "failed_runs"),
            readies=_int(data, "readies"),
            startup_seconds=tuple(float(t) for t in seconds),
            last_exit_code=_opt_int(data, "last_exit_code"),
            last_error=str(error) if error is not None else None,
            ready_since=_opt_float(data, "ready_since"),
            log_tail=tuple(str(line) for line in _list(data, "log_tail")),
            devices=tuple(DeviceReport.from_wire(d) for d in _list(data, "devices")),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "launches": self.launches,
            "failed_runs": self.failed_runs,
            "readies": self.readies,
            "startup_seconds": list(self.startup_seconds),
            "last_exit_code": self.last_exit_code,
            "last_error": self.last_error,
            "ready_since": self.ready_since,
            "log_tail": list(self.log_tail),
            "devices": [device.to_wire() for device in self.devices],
        }


@dataclass(frozen=True)
class IssueReport:
    """Something wrong reading the server (any issue makes the instance unusable)."""

    kind: str
    message: str


@dataclass(frozen=True)
class InstanceReport:
    """One instance of an agent's ``snapshot``, as the balancer reads it.

    ``state`` is ``ready``, ``starting``, ``failed`` or ``stopped``; ``busy`` of
    ``total_slots`` are in use as the agent last read them (``slot_source`` says how);
    ``supervisor`` is the supervising agent's view of the process (state, pid,
    restarts, last error, lifecycle counters), None when the agent only watches.
    """

    id: str
    url: str
    model: str = ""
    aliases: tuple[str, ...] = ()
    state: str = "ready"
    total_slots: int = 0
    busy: int = 0
    n_ctx: int = 0
    slot_source: str = "slots"
    sleeping: bool = False
    issues: tuple[IssueReport, ...] = ()
    supervisor: SupervisorReport | None = None

    @classmethod
    def from_wire(cls, data: object) -> InstanceReport:
        """Parse one instance of a snapshot frame; :class:`ProtocolError` if it is not one."""
        if not isinstance(data, Mapping):
            raise ProtocolError(f"an instance must be an object, got {type(data).__name__}")
        aliases = data.get("aliases") or []
        issues = data.get("issues") or []
        supervisor = data.get("supervisor")
        if not isinstance(aliases, list) or not isinstance(issues, list):
            raise ProtocolError("`aliases` and `issues` must be lists")
        return cls(
            id=_str(data, "id"),
            url=_str(data, "url"),
            model=str(data.get("model") or ""),
            aliases=tuple(str(a) for a in aliases),
            state=_str(data, "state", "ready"),
            total_slots=_int(data, "total_slots"),
            busy=_int(data, "busy"),
            n_ctx=_int(data, "n_ctx"),
            slot_source=str(data.get("slot_source") or "slots"),
            sleeping=bool(data.get("sleeping")),
            issues=tuple(
                IssueReport(str(i.get("kind", "unknown")), str(i.get("message", "")))
                for i in issues
                if isinstance(i, Mapping)
            ),
            supervisor=SupervisorReport.from_wire(supervisor) if supervisor is not None else None,
        )

    def to_wire(self) -> dict[str, Any]:
        """The instance as the agent writes it in a ``snapshot`` frame."""
        wire: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "model": self.model,
            "aliases": list(self.aliases),
            "state": self.state,
            "total_slots": self.total_slots,
            "busy": self.busy,
            "n_ctx": self.n_ctx,
            "slot_source": self.slot_source,
            "sleeping": self.sleeping,
            "issues": [{"kind": i.kind, "message": i.message} for i in self.issues],
        }
        if self.supervisor is not None:
            wire["supervisor"] = self.supervisor.to_wire()
        return wire
