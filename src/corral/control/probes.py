"""Liveness and readiness, the two questions an orchestrator asks a balancer.

- ``GET /livez``: is the balancer's control loop alive? The loop that takes silent
  agents' instances out of their pools beats every ``STALE_CHECK_INTERVAL``; when no
  beat came for ``LIVENESS_LIMIT`` seconds (the loop died, or something blocks the event
  loop between beats) it answers 503 and Kubernetes restarts the pod.
- ``GET /readyz``: can it place requests? 200 once both listeners are up and until
  shutdown begins; 503 while starting, draining or when the loop is not alive. No
  instance is needed: a balancer with no instance still buffers requests (scale from
  zero), so it stays in its Service.

Both are public on the management listener (they answer with a state word and a reason,
no fleet data), so a kubelet probes them without a token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from aiohttp import web

from corral.control.api_schema import ProbeFailing, ProbePassing, reply

#: Seconds without a beat of the control loop after which ``/livez`` fails.
LIVENESS_LIMIT = 10.0

PROBE_PATHS = frozenset({"/livez", "/readyz"})


class Probes:
    """The balancer's lifecycle as the two probes see it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = False
        """Both listeners are up."""
        self.stopping = False
        """Shutdown began: the inference listener is closing or closed."""
        self.last_beat: float | None = None

    def beat(self) -> None:
        """The control loop ran once."""
        self.last_beat = self.clock()

    def not_alive(self) -> str | None:
        """None while the control loop beats; else why not."""
        if self.last_beat is None:  # not started yet (the balancer beats as it starts)
            return None
        silent = self.clock() - self.last_beat
        if silent > LIVENESS_LIMIT:
            return f"the control loop has not run for {silent:.0f} s (limit {LIVENESS_LIMIT:.0f} s)"
        return None

    def not_ready(self) -> str | None:
        """None while the balancer places requests; else why not."""
        if self.stopping:
            return "shutting down: draining requests in flight"
        if not self.started:
            return "starting: the listeners are not up yet"
        return self.not_alive()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/livez", self.livez)
        router.add_get("/readyz", self.readyz)

    async def livez(self, request: web.Request) -> web.Response:
        return _answer("alive", self.not_alive())

    async def readyz(self, request: web.Request) -> web.Response:
        return _answer("ready", self.not_ready())


def _answer(good: Literal["alive", "ready"], problem: str | None) -> web.Response:
    if problem is None:
        return reply(ProbePassing(status=good))
    bad: Literal["not alive", "not ready"] = "not alive" if good == "alive" else "not ready"
    return reply(ProbeFailing(status=bad, reason=problem), 503)
