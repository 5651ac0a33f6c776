"""One request's context from its arrival to its last byte (the gateway's exchange).

The gateway fills it in as the request goes (admission: the model; the relay: the
instance, the wait) and every step that answers, records or relays takes it whole,
instead of a dozen loose arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from corral.config import ModelConfig
from corral.observe.tracing import NO_TRACE, NullTrace
from corral.scheduling.policies.base import Placement

if TYPE_CHECKING:
    from corral.gateway.notices import LoadingNotices


@dataclass(slots=True)
class Exchange:
    request: web.Request
    request_id: str
    route: str
    """The model route (``/v1/chat/completions`` ...) or ``other``: a metric label."""
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    """The pool the request goes to; empty until it resolved (and when it did not)."""
    asked: str = ""
    """The model name the client sent when it resolved to nothing (access log only)."""
    instance: str = ""
    """The instance that answered, or was tried last."""
    waited: float = 0.0
    """Seconds spent in the buffer, over every try."""
    config: ModelConfig | None = None
    """The model's settings under ``corral serve`` (None behind a plain balancer)."""
    placement: Placement | None = None
    notices: LoadingNotices | None = None
    body: bytes = b""
    """The body as it goes upstream (after the model's filters)."""
    trace: NullTrace = NO_TRACE
    """Its trace (:mod:`corral.observe.tracing`): a no-op unless traces are on."""
