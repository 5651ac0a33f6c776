"""Optional StatsD push of the fleet gauges (Paddler's names, so dashboards carry over).

Every ``interval`` seconds one UDP datagram carries, in the plain StatsD line format
(``NAME:VALUE|g``), the fleet totals and the same per model:

- ``PREFIX.slots_idle``, ``PREFIX.slots_processing``, ``PREFIX.requests_buffered``
- ``PREFIX.model.MODEL.slots_idle`` ... (model names sanitized to ``[A-Za-z0-9_-]``)
- ``PREFIX.wanted_instances`` and ``PREFIX.model.MODEL.wanted_instances``: the
  autoscaling signal (:mod:`corral.observe.autoscaling`, default target), for
  autoscalers fed by StatsD (e.g. the CloudWatch agent)

UDP never blocks the balancer: a lost datagram is a lost sample, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict

from corral.config import _parse_addr
from corral.observe.autoscaling import ANY_MODEL_NAME, fleet_demand
from corral.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def statsd_lines(scheduler: Scheduler, prefix: str) -> list[str]:
    """The gauges of the fleet right now, one StatsD line each."""
    now = scheduler.clock()
    idle: dict[str, int] = defaultdict(int)
    busy: dict[str, int] = defaultdict(int)
    for instance in scheduler.fleet.instances.values():
        if not instance.model or not instance.usable(now):
            continue
        idle[instance.model] += instance.free_slots
        busy[instance.model] += instance.busy_slots
    buffered = {m: scheduler.buffered(m) for m in scheduler.buffers if m}
    wanted = {d.model: d.wanted_instances for d in fleet_demand(scheduler)}
    lines = [
        f"{prefix}.slots_idle:{sum(idle.values())}|g",
        f"{prefix}.slots_processing:{sum(busy.values())}|g",
        f"{prefix}.requests_buffered:{scheduler.buffered()}|g",
        f"{prefix}.wanted_instances:{sum(wanted.values())}|g",
    ]
    models = set(idle) | set(busy) | set(buffered) | set(wanted)
    for model in sorted(models - {ANY_MODEL_NAME}):
        name = _UNSAFE.sub("_", model)
        lines += [
            f"{prefix}.model.{name}.slots_idle:{idle.get(model, 0)}|g",
            f"{prefix}.model.{name}.slots_processing:{busy.get(model, 0)}|g",
            f"{prefix}.model.{name}.requests_buffered:{buffered.get(model, 0)}|g",
            f"{prefix}.model.{name}.wanted_instances:{wanted.get(model, 0)}|g",
        ]
    return lines


class StatsdPusher:
    """Sends :func:`statsd_lines` to ``addr`` every ``interval`` seconds."""

    def __init__(
        self, scheduler: Scheduler, addr: str, prefix: str = "corral", interval: float = 1.0
    ) -> None:
        self.scheduler = scheduler
        self.host, self.port = _parse_addr(addr)
        self.prefix = prefix.rstrip(".")
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(self.host, self.port)
        )
        self._task = asyncio.create_task(self._run(), name="statsd")
        log.info("statsd push addr=%s:%d prefix=%s", self.host, self.port, self.prefix)

    def push(self) -> None:
        if self._transport is not None:
            payload = "\n".join(statsd_lines(self.scheduler, self.prefix)).encode()
            with contextlib.suppress(OSError):
                self._transport.sendto(payload)

    async def _run(self) -> None:
        while True:
            self.push()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._transport is not None:
            self._transport.close()
