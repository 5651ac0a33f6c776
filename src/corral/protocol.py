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


# -- model hosts ---------------------------------------------------------------------------
#
# An agent started with --models-dir (or a ``models`` table and no fixed instances) is a
# model host: after ``register`` with ``"role": "host"`` it sends ``{"type": "host",
# "seq": int, "host": HostReport}`` on every change and at least once a second, and takes
# ``{"type": "host_command", "id", "command": "load" | "unload", ...}`` from a balancer,
# answering ``{"type": "command_result", "id", "ok", "detail", ...}``. The instances it
# starts report themselves as any supervised instance does (their own agent links).


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"`{key}` must be a string or null, got {type(value).__name__}")
    return value


def _strings(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(str(v) for v in _list(data, key))


@dataclass(frozen=True)
class HostModelReport:
    """One model a host can start, with what its header says (enough for the balancer
    to estimate its memory as the host would) and the arguments the host runs it with."""

    id: str
    aliases: tuple[str, ...] = ()
    size_bytes: int = 0
    architecture: str | None = None
    context_length: int | None = None
    quantization: str | None = None
    kv_bytes_per_token: int | None = None
    layers: tuple[int, ...] = ()
    """Bytes of each repeating layer (empty: not known)."""
    embedding: int = 0
    output: int = 0
    tied: bool = False
    args: tuple[str, ...] = ()
    projector: bool = False

    @classmethod
    def from_wire(cls, data: object) -> HostModelReport:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"a host's model must be an object, got {type(data).__name__}")
        layers = _list(data, "layers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers):
            raise ProtocolError("`layers` must be a list of byte counts")
        return cls(
            id=_str(data, "id"),
            aliases=_strings(data, "aliases"),
            size_bytes=_int(data, "size_bytes"),
            architecture=_opt_str(data, "architecture"),
            context_length=_opt_int(data, "context_length"),
            quantization=_opt_str(data, "quantization"),
            kv_bytes_per_token=_opt_int(data, "kv_bytes_per_token"),
            layers=tuple(layers),
            embedding=_int(data, "embedding"),
            output=_int(data, "output"),
            tied=bool(data.get("tied")),
            args=_strings(data, "args"),
            projector=bool(data.get("projector")),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "aliases": list(self.aliases),
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "context_length": self.context_length,
            "quantization": self.quantization,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "layers": list(self.layers),
            "embedding": self.embedding,
            "output": self.output,
            "tied": self.tied,
            "args": list(self.args),
            "projector": self.projector,
        }


@dataclass(frozen=True)
class HostInstanceReport:
    """A server a host started for a balancer: its pool ``key`` (a model, or a model
    with per-request flags), where it answers, and how its start went."""

    key: str
    model: str
    url: str
    flags: tuple[str, ...] = ()
    state: str = "starting"
    """The supervisor's: ``starting``, ``ready``, ``failed``, ``stopped``."""
    error: str | None = None
    oom_device: str | None = None
    """Where it ran out of memory, when that is why it failed (``RAM`` when no device)."""

    @classmethod
    def from_wire(cls, data: object) -> HostInstanceReport:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"a host's instance must be an object, got {type(data).__name__}")
        return cls(
            key=_str(data, "key"),
            model=_str(data, "model"),
            url=_str(data, "url"),
            flags=_strings(data, "flags"),
            state=_str(data, "state", "starting"),
            error=_opt_str(data, "error"),
            oom_device=_opt_str(data, "oom_device"),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "url": self.url,
            "flags": list(self.flags),
            "state": self.state,
            "error": self.error,
            "oom_device": self.oom_device,
        }


@dataclass(frozen=True)
class HostReport:
    """What a model host tells every balancer: what it can start, the room it has, and
    what it runs."""

    id: str
    name: str = ""
    max_instances: int = 4
    memory_total: int = 0
    memory_available: int = 0
    devices: tuple[DeviceReport, ...] = ()
    devices_live: bool = False
    """The devices' free memory is read now (NVML), so it already counts the host's
    servers; otherwise it is llama-server's first listing."""
    models: tuple[HostModelReport, ...] = ()
    instances: tuple[HostInstanceReport, ...] = ()

    @classmethod
    def from_wire(cls, data: object) -> HostReport:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"`host` must be an object, got {type(data).__name__}")
        return cls(
            id=_str(data, "id"),
            name=str(data.get("name") or ""),
            max_instances=max(1, _int(data, "max_instances") or 4),
            memory_total=_int(data, "memory_total"),
            memory_available=_int(data, "memory_available"),
            devices=tuple(DeviceReport.from_wire(d) for d in _list(data, "devices")),
            devices_live=bool(data.get("devices_live")),
            models=tuple(HostModelReport.from_wire(m) for m in _list(data, "models")),
            instances=tuple(HostInstanceReport.from_wire(i) for i in _list(data, "instances")),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "max_instances": self.max_instances,
            "memory_total": self.memory_total,
            "memory_available": self.memory_available,
            "devices": [d.to_wire() for d in self.devices],
            "devices_live": self.devices_live,
            "models": [m.to_wire() for m in self.models],
            "instances": [i.to_wire() for i in self.instances],
        }
