"""The management API: fleet views, events, metrics, and the agents' WebSocket.

Every route is described, with its answers' shapes, by the OpenAPI document at
``/api/v1/openapi.json`` (:mod:`corral.control.openapi`). Every route but the
dashboard's static files and the probes (``/livez``, ``/readyz``:
:mod:`corral.control.probes`) needs a token: the management token for people and tools, the cluster
token for agents registering over ``/api/v1/agents/socket``. Both are compared in
constant time and never logged.

Agent protocol (JSON text frames, agent -> balancer):

- ``{"type": "register", "agent_id": str, "name": str, "version": str}`` first;
- ``{"type": "snapshot", "seq": int, "instances": [...]}`` on every change and at
  least once a second; ``seq`` grows by one per snapshot over the agent's life, so a
  balancer drops any snapshot not newer than the last it applied;
- ``{"type": "deregister"}`` on shutdown.

A model host (an agent with ``--models-dir``) registers with ``"role": "host"`` and then
sends ``{"type": "host", "seq": int, "host": {...}}`` (:class:`corral.protocol.HostReport`:
what it can start, its memory and devices, what it runs) instead of snapshots; the
balancer sends it ``{"type": "host_command", "id", "command": "load" | "unload", ...}``
and it answers ``{"type": "command_result", "id", "ok", "detail", ...}``.

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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral import __version__
from corral.control.admin import InstanceAdmin
from corral.control.api_schema import (
    AgentsList,
    AutoscalingQuery,
    BadInput,
    BufferView,
    FleetDemandView,
    FleetView,
    InstancesList,
    ModelDemandView,
    parse_query,
    reply,
)
from corral.control.dashboard import Dashboard, is_public
from corral.control.http_errors import note_prepared, openai_errors
from corral.control.models_admin import ModelAdmin
from corral.control.openapi import OPENAPI_PATH, openapi_text
from corral.control.probes import PROBE_PATHS, Probes
from corral.gateway.auth import key_matches, presented_key
from corral.gateway.errors import error_response
from corral.observe.autoscaling import fleet_demand, model_demand
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.protocol import AGENT_SOCKET_PATH, HostReport, InstanceReport
from corral.scheduling.scheduler import Scheduler
from corral.tls import verified_peer

if TYPE_CHECKING:
    from corral.hosting import Host

HostSend = Callable[[dict[str, Any], float], Awaitable[dict[str, Any] | None]]

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
        agent_auth: str = "token",
    ) -> None:
        self.scheduler = scheduler
        self.agent_auth = agent_auth
        """What lets an agent register: ``token``, ``certificate`` (mutual TLS) or ``both``."""
        self.metrics = metrics
        self.management_token = management_token
        self.cluster_token = cluster_token
        self.event_queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self.sockets: set[web.WebSocketResponse] = set()
        self.agent_sockets: dict[str, web.WebSocketResponse] = {}
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._command_ids = itertools.count(1)
        scheduler.listeners.append(self._broadcast)
        self.app = web.Application(middlewares=[openai_errors, self._auth])
        self.app.on_response_prepare.append(note_prepared)
        r = self.app.router
        r.add_get(OPENAPI_PATH, self.openapi)
        r.add_get(AGENT_SOCKET_PATH, self.agent_socket)
        r.add_get("/api/v1/agents", self.agents)
        r.add_get("/api/v1/instances", self.instances)
        InstanceAdmin(self).add_routes(r)
        self.host: Host | None = None
        """The model host (``corral serve``'s, or a balancer's over remote model hosts
        once one registers); None for a bare balancer."""
        self.on_host_report: Callable[[HostReport, HostSend], None] | None = None
        """Gets every model host's report and how to send it commands."""
        self.on_host_gone: Callable[[str], None] | None = None
        """Told when a model host's connection ends."""
        self.host_seq: dict[str, int] = {}
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
        if request.path == AGENT_SOCKET_PATH:
            refused = self._agent_refused(request)
            if refused is not None:
                return refused
            response = await handler(request)
            return response
        if not key_matches(presented_key(request), [self.management_token]):
            return error_response(
                401,
                "missing or invalid management token: send `Authorization: Bearer TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        response = await handler(request)
        return response

    def _agent_refused(self, request: web.Request) -> web.Response | None:
        """None when the agent may register (``agent_auth``); else the 401 saying what
        it lacks: the cluster token, a verified client certificate, or both."""
        lacks = []
        if self.agent_auth in ("certificate", "both") and not verified_peer(request.transport):
            lacks.append("a client certificate issued by the balancer's tls_client_ca")
        if self.agent_auth in ("token", "both") and not key_matches(
            presented_key(request), [self.cluster_token]
        ):
            lacks.append("the cluster token (`Authorization: Bearer TOKEN`)")
        if not lacks:
            return None
        return error_response(
            401,
            "agent refused: it needs " + " and ".join(lacks),
            headers={"WWW-Authenticate": "Bearer"},
        )

    # -- views --------------------------------------------------------------------------

    async def agents(self, request: web.Request) -> web.Response:
        agents = [a.as_dict() for a in self.scheduler.fleet.agents.values()]
        return reply(AgentsList.model_validate({"agents": agents}))

    async def instances(self, request: web.Request) -> web.Response:
        instances = [i.as_dict() for i in self.scheduler.fleet.instances.values()]
        return reply(InstancesList.model_validate({"instances": instances}))

    async def openapi(self, request: web.Request) -> web.Response:
        """This API's OpenAPI description (:mod:`corral.control.openapi`)."""
        return web.Response(text=openapi_text(), content_type="application/json")

    async def command(
        self,
        agent_id: str,
        instance_id: str,
        command: str,
        payload: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Send a command over the agent's socket and wait (10 s) for its result;
        None when the agent is not connected or does not answer."""
        frame = {
            "type": "command",
            "command": command,
            "instance": instance_id.split("/", 1)[1],
            **(payload or {}),
        }
        return await self._ask(agent_id, frame, 10.0)

    async def host_command(
        self,
        host_id: str,
        payload: dict[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, Any] | None:
        """Send a ``host_command`` to a model host and wait for its result; None when
        it is not connected or does not answer within ``timeout``."""
        return await self._ask(host_id, {"type": "host_command", **payload}, timeout)

    async def _ask(
        self, agent_id: str, frame: dict[str, Any], limit_s: float
    ) -> dict[str, Any] | None:
        """Send ``frame`` (with a fresh ``id``) over the agent's socket and wait at most
        ``limit_s`` for the ``command_result`` with that id."""
        ws = self.agent_sockets.get(agent_id)
        if ws is None:
            return None
        command_id = next(self._command_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await ws.send_json({**frame, "id": command_id})
            async with asyncio.timeout(limit_s):
                return await future
        except (TimeoutError, ConnectionResetError):
            return None
        finally:
            self._pending.pop(command_id, None)

    def _host_sender(self, host_id: str) -> HostSend:
        async def send(payload: dict[str, Any], timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109
            return await self.host_command(host_id, payload, timeout)

        return send

    async def buffer(self, request: web.Request) -> web.Response:
        depth = {m or "(any)": self.scheduler.buffered(m) for m in self.scheduler.buffers}
        return reply(
            BufferView(
                buffered=self.scheduler.buffered(),
                by_model=depth,
                max_buffered_requests=self.scheduler.max_buffered,
                buffered_request_timeout=self.scheduler.buffer_timeout,
            )
        )

    async def fleet(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """:class:`~corral.control.api_schema.FleetView`, JSON-ready (the events
        stream's first event, the dashboard's too)."""
        fleet = self.scheduler.fleet
        view = FleetView.model_validate(
            {
                "version": __version__,
                "time": time.time(),
                "agents": [a.as_dict() for a in fleet.agents.values()],
                "instances": [i.as_dict() for i in fleet.instances.values()],
                "buffered": {
                    m or "(any)": self.scheduler.buffered(m) for m in self.scheduler.buffers
                },
                "models": fleet.served_models(),
            }
        )
        return view.model_dump(mode="json", exclude_unset=True)

    async def autoscaling(self, request: web.Request) -> web.Response:
        """Wanted instances per model (:mod:`corral.observe.autoscaling`); ``?model=``
        answers for one model at the top level, ``?target=`` sets the utilization."""
        try:
            query = parse_query(AutoscalingQuery, request)
        except BadInput as exc:
            return error_response(400, str(exc))
        if query.model is not None:
            one = model_demand(self.scheduler, query.model, query.target)
            return reply(ModelDemandView.model_validate(one.as_dict()))
        models = fleet_demand(self.scheduler, query.target)
        return reply(
            FleetDemandView(
                target_utilization=query.target,
                wanted_instances=sum(m.wanted_instances for m in models),
                models={m.model: ModelDemandView.model_validate(m.as_dict()) for m in models},
            )
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
        model_host = False
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
                    model_host = data.get("role") == "host"
                    if model_host:
                        self.host_seq.pop(agent_id, None)
                        log.info("model host registered host=%s name=%s remote=%s",
                                 agent_id, data.get("name"), remote)  # fmt: skip
                        await ws.send_json({"type": "registered", "balancer_version": __version__})
                        continue
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
                elif kind == "host" and agent_id is not None and model_host:
                    try:
                        seq = int(data["seq"])
                        report = HostReport.from_wire(data.get("host"))
                    except (KeyError, TypeError, ValueError) as exc:  # ProtocolError too
                        await ws.send_json({"type": "error", "message": f"bad host report: {exc}"})
                        continue
                    if seq <= self.host_seq.get(agent_id, -1) or report.id != agent_id:
                        continue  # an old report, or one for another host
                    self.host_seq[agent_id] = seq
                    if self.on_host_report is not None:
                        self.on_host_report(report, self._host_sender(agent_id))
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
                if model_host:
                    log.info("model host left host=%s", agent_id)
                    self.host_seq.pop(agent_id, None)
                    if self.on_host_gone is not None:
                        self.on_host_gone(agent_id)
                else:
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
