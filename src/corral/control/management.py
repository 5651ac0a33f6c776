"""The management API: fleet views, events, metrics, and the agents' WebSocket.

Every route but the dashboard's static files and the probes (``/livez``, ``/readyz``:
:mod:`corral.control.probes`) needs a token: the management token for people and tools, the cluster
token for agents registering over ``/api/v1/agents/socket``. Both are compared in
constant time and never logged.

Agent protocol (JSON text frames, agent -> balancer):

- ``{"type": "register", "agent_id": str, "name": str, "version": str}`` first;
- ``{"type": "snapshot", "seq": int, "instances": [...]}`` on every change and at
  least once a second; ``seq`` grows by one per snapshot over the agent's life, so a
  balancer drops any snapshot not newer than the last it applied;
- ``{"type": "deregister"}`` on shutdown.

Each instance in a snapshot: ``id``, ``url`` (how the balancer reaches it), ``model``,
``aliases``, ``state``, ``total_slots``, ``busy``, ``n_ctx``, ``slot_source``, ``issues`` (list of
``{"kind", "message"}``; any issue makes the instance unusable), and ``supervisor``
when the agent owns the process (``state``, ``pid``, ``restarts``, ``last_error``, ...;
its cumulative ``launches``, ``restarts``, ``failed_runs``, ``readies`` and recent
``startup_seconds`` feed the instance lifecycle metrics).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral import __version__
from corral.control.admin import InstanceAdmin
from corral.control.dashboard import Dashboard, is_public
from corral.control.models_admin import ModelAdmin
from corral.control.probes import PROBE_PATHS, Probes
from corral.gateway.auth import key_matches, presented_key
from corral.gateway.errors import error_response
from corral.observe.autoscaling import TARGET_UTILIZATION, fleet_demand, model_demand
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.protocol import AGENT_SOCKET_PATH, InstanceReport
from corral.scheduling.scheduler import Scheduler

if TYPE_CHECKING:
    from corral.hosting import Host

log = logging.getLogger(__name__)


class Management:
    """The management HTTP app of a balancer."""

    def __init__(
        self,
        scheduler: Scheduler,
        metrics: BalancerMetrics,
        *,
        management_token: str,
        cluster_token: str,
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.management_token = management_token
        self.cluster_token = cluster_token
        self.event_queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.agent_sockets: dict[str, web.WebSocketResponse] = {}
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._command_ids = itertools.count(1)
        scheduler.listeners.append(self._broadcast)
        self.app = web.Application(middlewares=[self._auth])
        r = self.app.router
        r.add_get(AGENT_SOCKET_PATH, self.agent_socket)
        r.add_get("/api/v1/agents", self.agents)
        r.add_get("/api/v1/instances", self.instances)
        InstanceAdmin(self).add_routes(r)
        self.host: Host | None = None
        """The local model host (``corral serve``); None for a bare balancer."""
        self.models_admin = ModelAdmin(lambda: self.host)
        self.models_admin.add_routes(r)
        r.add_get("/api/v1/buffer", self.buffer)
        r.add_get("/api/v1/fleet", self.fleet)
        r.add_get("/api/v1/autoscaling", self.autoscaling)
        r.add_get("/api/v1/events", self.events)
        r.add_get("/metrics", self.prometheus)
        self.probes = Probes()
        """``/livez`` and ``/readyz``: the balancer drives their state."""
        self.probes.add_routes(r)
        self.traffic: RecentTraffic | None = None
        """Recent traffic per model (the balancer's), for the dashboard."""
        Dashboard(self).add_routes(r)
        self.app.on_shutdown.append(self._close_sockets)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if is_public(request.path) or request.path in PROBE_PATHS:
            response: web.StreamResponse = await handler(request)
            return response  # the dashboard's static files and the probes: no data in them
        token = self.cluster_token if request.path == AGENT_SOCKET_PATH else self.management_token
        if not key_matches(presented_key(request), [token]):
            what = "cluster token" if request.path == AGENT_SOCKET_PATH else "management token"
            return error_response(
                401,
                f"missing or invalid {what}: send `Authorization: Bearer TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        response = await handler(request)
        return response

    # -- views --------------------------------------------------------------------------

    async def agents(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"agents": [a.as_dict() for a in self.scheduler.fleet.agents.values()]}
        )

    async def instances(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"instances": [i.as_dict() for i in self.scheduler.fleet.instances.values()]}
        )

    async def command(
        self,
        agent_id: str,
        instance_id: str,
        command: str,
        payload: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Send a command over the agent's socket and wait (10 s) for its result;
        None when the agent is not connected or does not answer."""
        ws = self.agent_sockets.get(agent_id)
        if ws is None:
            return None
        command_id = next(self._command_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await ws.send_json(
                {
                    "type": "command",
                    "id": command_id,
                    "command": command,
                    "instance": instance_id.split("/", 1)[1],
                    **(payload or {}),
                }
            )
            async with asyncio.timeout(10):
                return await future
        except (TimeoutError, ConnectionResetError):
            return None
        finally:
            self._pending.pop(command_id, None)

    async def buffer(self, request: web.Request) -> web.Response:
        depth = {m or "(any)": self.scheduler.buffered(m) for m in self.scheduler.buffers}
        return web.json_response(
            {
                "buffered": self.scheduler.buffered(),
                "by_model": depth,
                "max_buffered_requests": self.scheduler.max_buffered,
                "buffered_request_timeout": self.scheduler.buffer_timeout,
            }
        )

    async def fleet(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        fleet = self.scheduler.fleet
        return {
            "version": __version__,
            "time": time.time(),
            "agents": [a.as_dict() for a in fleet.agents.values()],
            "instances": [i.as_dict() for i in fleet.instances.values()],
            "buffered": {m or "(any)": self.scheduler.buffered(m) for m in self.scheduler.buffers},
            "models": fleet.served_models(),
        }

    async def autoscaling(self, request: web.Request) -> web.Response:
        """Wanted instances per model (:mod:`corral.observe.autoscaling`); ``?model=``
        answers for one model at the top level, ``?target=`` sets the utilization."""
        raw = request.query.get("target", str(TARGET_UTILIZATION))
        try:
            target = float(raw)
        except ValueError:
            target = -1.0
        if not 0 < target <= 1:
            return error_response(400, f"target must be a number in (0, 1], not {raw!r}")
        model = request.query.get("model")
        if model is not None:
            return web.json_response(model_demand(self.scheduler, model, target).as_dict())
        models = fleet_demand(self.scheduler, target)
        return web.json_response(
            {
                "target_utilization": target,
                "wanted_instances": sum(m.wanted_instances for m in models),
                "models": {m.model: m.as_dict() for m in models},
            }
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- events (server-sent) ----------------------------------------------------------

    def _broadcast(self, event: dict[str, Any]) -> None:
        for queue in self.event_queues:
            if queue.qsize() < 1000:  # a stalled reader loses events, never memory
                queue.put_nowait(event)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.event_queues.add(queue)
        try:
            await response.write(
                b"event: fleet\ndata: " + json.dumps(self.snapshot()).encode() + b"\n\n"
            )
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event.get("type") == "_closing":
                    break
                await response.write(
                    b"event: "
                    + str(event.get("type", "change")).encode()
                    + b"\ndata: "
                    + json.dumps(event).encode()
                    + b"\n\n"
                )
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.event_queues.discard(queue)
        return response

    # -- agents --------------------------------------------------------------------------

    async def agent_socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=5.0, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        self.sockets.add(ws)
        agent_id: str | None = None
        remote = request.remote or ""
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    if message.type == WSMsgType.ERROR:
                        break
                    continue
                try:
                    data = json.loads(message.data)
                    kind = data["type"]
                    if kind == "register" and not isinstance(data.get("agent_id"), str):
                        raise ValueError("register needs a string agent_id")
                except (ValueError, KeyError, TypeError):
                    await ws.send_json({"type": "error", "message": "bad message"})
                    continue
                if kind == "register":
                    agent_id = str(data["agent_id"])
                    previous = self.agent_sockets.get(agent_id)
                    self.agent_sockets[agent_id] = ws
                    if previous is not None and previous is not ws:
                        await previous.close()  # the agent reconnected: keep the new socket
                    self.scheduler.register_agent(agent_id, str(data.get("name", agent_id)), remote)
                    log.info(
                        "agent registered agent=%s name=%s remote=%s",
                        agent_id,
                        data.get("name"),
                        remote,
                    )
                    await ws.send_json({"type": "registered", "balancer_version": __version__})
                elif kind == "snapshot" and agent_id is not None:
                    try:
                        reports = [InstanceReport.from_wire(i) for i in data.get("instances", [])]
                        applied = self.scheduler.apply_snapshot(agent_id, int(data["seq"]), reports)
                    except (KeyError, TypeError, ValueError) as exc:  # ProtocolError too
                        await ws.send_json({"type": "error", "message": f"bad snapshot: {exc}"})
                    else:
                        if applied:
                            self._count_supervisors(agent_id)
                elif kind == "command_result":
                    pending = self._pending.get(data.get("id"))
                    if pending is not None and not pending.done():
                        pending.set_result(data)
                elif kind == "deregister":
                    break
        finally:
            self.sockets.discard(ws)
            if agent_id is not None and self.agent_sockets.get(agent_id) is ws:
                del self.agent_sockets[agent_id]
                log.info("agent left agent=%s", agent_id)
                self.scheduler.agent_gone(agent_id)
        return ws

    def _count_supervisors(self, agent_id: str) -> None:
        fleet = self.scheduler.fleet
        agent = fleet.agents.get(agent_id)
        if agent is not None:
            self.metrics.observe_supervisors(
                fleet.instances[i] for i in sorted(agent.instance_ids) if i in fleet.instances
            )

    async def _close_sockets(self, app: web.Application) -> None:
        for queue in self.event_queues:
            queue.put_nowait({"type": "_closing"})  # ends every event stream
        for ws in list(self.sockets):
            await ws.close()
