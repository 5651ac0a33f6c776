"""What the edges (the gateway, the management API) need to know of the model host,
without importing it (the host imports the supervisor and the agent).

The host itself is :class:`corral.supervisor.host.ModelHost`.
"""

from __future__ import annotations


class LoadRefused(Exception):
    """A model cannot be loaded here; the message says why and what to change.

    ``detail`` is the longer story for the operator (the server's last log lines): the
    management API shows it; a client gets only the message."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message
