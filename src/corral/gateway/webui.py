"""What llama-server's web UI asks a router-mode server, answered for corral's models.

llama-server's built-in web UI (served at ``/`` by every llama-server) works in two
modes. Against one model it reads that server's ``/props``; against llama-server's
router mode it sees ``"role": "router"`` in ``/props``, lists models from
``/v1/models`` (``status.value`` per model), follows ``/models/sse`` for load and
unload events, asks ``POST /models/load`` when a model is picked, reads
``/props?model=ID&autoload=false`` for a loaded model and sends chats with ``model``
set. When ``corral serve`` has one model, every request goes to it and the UI runs in
model mode; with several, these routes make corral answer like router mode:

- ``GET /props`` with no model: router mode's placeholder props (``role: router``);
  with ``?model=ID`` (or ``X-Model-Id``) it is that model's instance's ``/props``,
  started on demand unless ``autoload=false`` (then 400 while it is not loaded, as
  router mode answers).
- ``GET /models/sse``: ``status_change`` events from the scheduler's model events
  (``loading``, ``loaded``, ``unloaded``, ``failed``), after one ``model_status`` per
  listed model.
- ``POST /models/load``: an explicit load (what a request for the model would start
  anyway). ``POST /models/unload`` is refused: on the inference port it would let any
  client stop a model others use; the management API unloads.
- ``POST /v1/streams/lookup``: ``[]``. Resuming a stream after a page reload needs
  the instance that runs it, and a pool may hold several; the UI then shows the
  conversation as it was saved.

The page and its assets are passed through to a ready instance (see
:meth:`~corral.gateway.proxy.Gateway.forward`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral.gateway.errors import error_response
from corral.hosting import LoadRefused
from corral.scheduling.scheduler import ModelRequired, SchedulingError

if TYPE_CHECKING:
    from corral.gateway.proxy import Gateway

log = logging.getLogger(__name__)

#: Seconds between SSE comments on an idle ``/models/sse``, so proxies keep it open.
SSE_KEEPALIVE = 15.0

#: Events a slow ``/models/sse`` reader may fall behind by before losing some.
SSE_QUEUE_LIMIT = 1000

#: corral's model events as router mode's statuses.
STATUS_OF_EVENT = {
    "loading": "loading",
    "loaded": "loaded",
    "unloading": "unloaded",
    "unloaded": "unloaded",
    "load_failed": "failed",
}

_CLOSING: dict[str, Any] = {"type": "_closing"}


class WebUIRoutes:
    """Router mode's UI routes on the gateway's app; see the module doc."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.queues: set[asyncio.Queue[dict[str, Any]]] = set()
        gateway.scheduler.listeners.append(self._broadcast)
        app = gateway.app
        gateway.route("GET", "/props", self.props)
        gateway.route("GET", "/models/sse", self.model_events)
        gateway.route("POST", "/models/load", self.load)
        gateway.route("POST", "/models/unload", self.unload)
        gateway.route("POST", "/v1/streams/lookup", self.streams_lookup)
        app.on_shutdown.append(self._close_streams)

    def several_models(self) -> bool:
        """True when a request that names no model cannot be placed (router mode)."""
        try:
            self.gateway.scheduler.resolve_model(None)
        except ModelRequired:
            return True
        return False

    async def props(self, request: web.Request) -> web.StreamResponse:
        named = request.headers.get("X-Model-Id") or request.query.get("model")
        if not named and self.several_models():
            return web.json_response(self._router_props())
        if named and request.query.get("autoload") in ("false", "0"):
            refused = self._not_loaded(named)
            if refused is not None:
                return refused
        return await self.gateway.forward(request)

    def _router_props(self) -> dict[str, Any]:
        host = self.gateway.host
        return {
            "role": "router",
            "max_instances": host.max_instances if host is not None else 0,
            "models_autoload": True,
            # router mode's placeholders, which the UI expects to find
            "model_alias": "corral",
            "model_path": "none",
            "default_generation_settings": {"params": None, "n_ctx": 0},
            "ui_settings": {},
            "build_info": "corral",
            "cors_proxy_enabled": False,
        }

    def _not_loaded(self, named: str) -> web.Response | None:
        """Router mode's 400 for ``autoload=false`` and a model with no ready instance."""
        scheduler = self.gateway.scheduler
        try:
            model = scheduler.resolve_model(named)
        except SchedulingError as exc:
            return error_response(exc.status, exc.message, exc.error_type)
        now = scheduler.clock()
        if any(i.usable(now) for i in scheduler.fleet.pool(model)):
            return None
        return error_response(400, f"model {model!r} is not loaded (autoload=false)")

    async def load(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return error_response(400, "`model` must be a non-empty string")
        host = self.gateway.host
        if host is None:
            return error_response(
                501, "models are loaded on demand by `corral serve`; this balancer starts none"
            )
        try:
            key = host.load(name)
        except LoadRefused as exc:
            return error_response(404, str(exc))
        log.info("load asked on the inference port model=%s", key)
        return web.json_response({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        return error_response(
            403,
            "unloading is an operator action: use the management API "
            "(POST /api/v1/models/{id}/unload on the management address)",
        )

    async def streams_lookup(self, request: web.Request) -> web.StreamResponse:
        if not self.several_models():
            return await self.gateway.forward(request)
        return web.json_response([])

    # -- /models/sse -----------------------------------------------------------------

    def _broadcast(self, event: dict[str, Any]) -> None:
        if event.get("type") != "model" or event.get("event") not in STATUS_OF_EVENT:
            return
        for queue in self.queues:
            if queue.qsize() < SSE_QUEUE_LIMIT:  # a stalled reader loses events, not memory
                queue.put_nowait(event)

    async def _close_streams(self, app: web.Application) -> None:
        for queue in self.queues:
            queue.put_nowait(_CLOSING)

    def _snapshot(self) -> list[dict[str, Any]]:
        host = self.gateway.host
        if host is None:
            return []
        return [
            {
                "model": row["id"],
                "event": "model_status",
                "data": {"status": "unloaded" if row["state"] == "unloading" else row["state"]},
            }
            for row in host.status()
            if not row["unlisted"]
        ]

    async def model_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues.add(queue)
        try:
            await response.prepare(request)
            for record in self._snapshot():
                await response.write(_sse(record))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is _CLOSING:
                    break
                record = {
                    "model": event["model"],
                    "event": "status_change",
                    "data": {"status": STATUS_OF_EVENT[event["event"]]},
                }
                await response.write(_sse(record))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.queues.discard(queue)
        return response


def _sse(record: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(record).encode() + b"\n\n"
