"""What the agent and the balancer share on the wire (the bottom layer: it imports
nothing of corral's).

The agent protocol's frames are described in :mod:`corral.control.management`, which
serves them; this module holds what both sides must agree on so neither imports the
other: the socket's path, and :class:`InstanceReport`, one instance of a ``snapshot``
as the balancer reads it (the agent writes the same fields as JSON).
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
    supervisor: Mapping[str, Any] | None = None

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
        if supervisor is not None and not isinstance(supervisor, Mapping):
            raise ProtocolError("`supervisor` must be an object")
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
            supervisor=supervisor,
        )
