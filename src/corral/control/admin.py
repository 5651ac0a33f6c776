"""Admin actions on instances, through the management API (token-protected).

Every action that stops a server drains it first: the balancer stops placing new
requests on it, in-flight ones finish (bounded by ``?drain_timeout=``, 30 s), and only
then does the instance's agent restart it. Requests that arrive meanwhile wait in
the buffer or go to other instances of the model. Commands travel over the agent's
WebSocket, so the same calls work for ``corral serve`` and for remote agents.

Routes (``AGENT/ID`` is the instance id shown by ``/api/v1/instances``; their answers,
query parameters and defaults are typed in :mod:`corral.control.api_schema`):

- ``POST /api/v1/instances/AGENT/ID/restart``: drain, restart.
- ``POST /api/v1/instances/AGENT/ID/reconfigure`` with ``{"args": [...]}`` and/or
  ``{"port": N}``: check the llama-server arguments (see
  :mod:`corral.supervisor.flags`), drain, restart with them (on the new loopback port).
- ``GET /api/v1/instances/AGENT/ID/logs?lines=N``: the last N log lines (200);
  ``&follow=1`` streams new lines as server-sent events.
- ``POST /api/v1/models/MODEL/restart``: a rolling restart, one instance at a time,
  each back to ready before the next goes down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from corral.control.api_schema import (
    MAX_LOG_LINES,
    BadInput,
    DrainQuery,
    LogsAnswer,
    LogsQuery,
    Query,
    ReconfigureAnswer,
    RestartAnswer,
    RestartStep,
    RollingRestartAnswer,
    RollingRestartQuery,
    parse_query,
    reply,
)
from corral.fleet.state import Instance, InstanceState
from corral.gateway.errors import error_response
from corral.supervisor.flags import FlagError, check_llama_args

if TYPE_CHECKING:
    from corral.control.management import Management

log = logging.getLogger(__name__)

LOG_FOLLOW_INTERVAL = 0.5


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Q = TypeVar("Q", bound=Query)


def _query(model: type[Q], request: web.Request) -> Q:
    """The route's query parameters (:mod:`corral.control.api_schema`), or a 400."""
    try:
        return parse_query(model, request)
    except BadInput as exc:
        raise AdminError(400, str(exc)) from None


class InstanceAdmin:
    """Restart, reconfigure and read logs of instances; see the module doc."""

    def __init__(self, management: Management) -> None:
        self.management = management
        self.scheduler = management.scheduler

    def add_routes(self, router: web.UrlDispatcher) -> None:
        base = "/api/v1/instances/{agent}/{local}"
        router.add_post(base + "/restart", self.restart)
        router.add_post(base + "/reconfigure", self.reconfigure)
        router.add_get(base + "/logs", self.logs)
        router.add_post("/api/v1/models/{model}/restart", self.rolling_restart)

    # -- helpers ------------------------------------------------------------------------

    def _instance(self, request: web.Request) -> Instance:
        instance_id = f"{request.match_info['agent']}/{request.match_info['local']}"
        instance = self.scheduler.fleet.instances.get(instance_id)
        if instance is None:
            raise AdminError(404, f"no instance {instance_id!r}; see /api/v1/instances")
        return instance

    async def _drain_and_command(
        self, instance: Instance, drain_timeout: float, command: str, payload: dict[str, Any]
    ) -> bool:
        ws = self.management.agent_sockets.get(instance.agent_id)
        if ws is None or ws.closed:
            raise AdminError(409, f"the agent of {instance.id} is not connected")
        drained = await self.scheduler.drain(instance, drain_timeout)
        reply = await self.management.command(instance.agent_id, instance.id, command, payload)
        if reply is None or not reply.get("ok"):
            self.scheduler.undrain(instance)
            detail = "no answer from the agent" if reply is None else reply.get("detail")
            raise AdminError(409, f"the agent could not {command} {instance.id}: {detail}")
        return drained

    async def _wait_ready(self, instance_id: str, limit_s: float) -> bool:
        """Wait until the instance is ready and usable again (False after ``limit_s``)."""

        def ready() -> bool:
            instance = self.scheduler.fleet.instances.get(instance_id)
            return (
                instance is not None
                and not instance.draining
                and instance.state is InstanceState.READY
                and instance.usable(self.scheduler.clock())
            )

        return await self.scheduler.wait_until(ready, limit_s)

    @staticmethod
    def _error(exc: AdminError) -> web.Response:
        return error_response(exc.status, exc.message)

    # -- routes -------------------------------------------------------------------------

    async def restart(self, request: web.Request) -> web.Response:
        try:
            query = _query(DrainQuery, request)
            instance = self._instance(request)
            drained = await self._drain_and_command(instance, query.drain_timeout, "restart", {})
        except AdminError as exc:
            return self._error(exc)
        return reply(RestartAnswer(instance=instance.id, restarting=True, drained=drained), 202)

    async def reconfigure(self, request: web.Request) -> web.Response:
        try:
            query = _query(DrainQuery, request)
            change = await self._change(request)  # a bad request is a 400 for any instance
            instance = self._instance(request)
            drained = await self._drain_and_command(
                instance, query.drain_timeout, "reconfigure", change
            )
        except AdminError as exc:
            return self._error(exc)
        answer = ReconfigureAnswer(instance=instance.id, restarting=True, drained=drained, **change)
        return reply(answer, 202)

    @staticmethod
    async def _change(request: web.Request) -> dict[str, Any]:
        """The reconfigure body (:class:`~corral.control.api_schema.ReconfigureRequest`),
        checked by hand so that each refusal says exactly which argument is wrong."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deep
            raise AdminError(400, 'the body must be JSON: {"args": ["--flag", "value"]}') from None
        usage = 'the body must be {"args": [...], "port": N}, with at least one of them'
        if not isinstance(body, dict) or not ({"args", "port"} & set(body)):
            raise AdminError(400, usage)
        if set(body) - {"args", "port"}:
            raise AdminError(400, f"unknown keys {sorted(set(body) - {'args', 'port'})}")
        change: dict[str, Any] = {}
        if "args" in body:
            if not isinstance(body["args"], list):
                raise AdminError(400, "args must be a list of strings")
            try:
                change["args"] = check_llama_args(body["args"])
            except FlagError as exc:
                raise AdminError(400, f"refused llama-server arguments: {exc}") from None
        if "port" in body:
            port = body["port"]
            if isinstance(port, float) and port.is_integer():
                port = int(port)  # 8080.0 is the integer 8080 to JSON (and its schema)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise AdminError(400, "port must be a whole number from 1 to 65535")
            change["port"] = port
        return change

    async def rolling_restart(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        try:
            query = _query(RollingRestartQuery, request)
            pool = sorted(self.scheduler.fleet.pool(model), key=lambda i: i.id)
            if not pool:
                raise AdminError(404, f"no instance serves model {model!r}")
            results: list[RestartStep] = []
            for instance in pool:
                drained = await self._drain_and_command(
                    instance, query.drain_timeout, "restart", {}
                )
                await self._wait_down(instance.id)
                ready = await self._wait_ready(instance.id, query.ready_timeout)
                results.append(RestartStep(instance=instance.id, drained=drained, ready=ready))
                if not ready:
                    steps = json.dumps([step.model_dump() for step in results])
                    raise AdminError(
                        504,
                        f"{instance.id} was not ready again within {query.ready_timeout:g} s; "
                        f"the rolling restart stopped there: {steps}",
                    )
        except AdminError as exc:
            return self._error(exc)
        return reply(RollingRestartAnswer(model=model, restarted=results))

    async def _wait_down(self, instance_id: str, limit_s: float = 10.0) -> None:
        """Wait until the agent reports the instance not ready (the restart began)."""

        def down() -> bool:
            instance = self.scheduler.fleet.instances.get(instance_id)
            return instance is None or not instance.draining

        await self.scheduler.wait_until(down, limit_s)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        try:
            query = _query(LogsQuery, request)
            instance = self._instance(request)
            answer = await self.management.command(
                instance.agent_id, instance.id, "logs", {"lines": min(query.lines, MAX_LOG_LINES)}
            )
            if answer is None or not answer.get("ok"):
                detail = "no answer from the agent" if answer is None else answer.get("detail")
                raise AdminError(409, f"cannot read the logs of {instance.id}: {detail}")
        except AdminError as exc:
            return self._error(exc)
        if not query.follow:
            return reply(
                LogsAnswer(instance=instance.id, lines=answer["lines"], cursor=answer["cursor"])
            )
        return await self._follow(request, instance, answer)

    async def _follow(
        self, request: web.Request, instance: Instance, first: dict[str, Any]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        reply: dict[str, Any] | None = first
        try:
            while reply is not None and reply.get("ok"):
                for line in reply["lines"]:
                    await response.write(b"data: " + json.dumps(line).encode() + b"\n\n")
                cursor = reply["cursor"]
                await asyncio.sleep(LOG_FOLLOW_INTERVAL)
                reply = await self.management.command(
                    instance.agent_id, instance.id, "logs", {"since": cursor}
                )
            await response.write(b"event: end\ndata: {}\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response
