"""What the agent and the balancer share on the wire (the bottom layer: it imports
nothing of corral's).

The agent protocol itself (message types, the snapshot's fields) is described in
:mod:`corral.control.management`, which serves it; this module holds what both sides
must agree on so neither imports the other.
"""

from __future__ import annotations

AGENT_SOCKET_PATH = "/api/v1/agents/socket"
"""The balancer's management route an agent opens its WebSocket on."""
