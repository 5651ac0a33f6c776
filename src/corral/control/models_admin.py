"""Admin actions on models, through the management API (token-protected).

These need a model host: ``corral serve`` has one; a bare ``corral balancer`` (whose
instances belong to remote agents) answers 501.

- ``GET /api/v1/models``: every catalog model with its state (``unloaded``,
  ``loading``, ``loaded``, ``unloading``), group, size, last load error.
- ``POST /api/v1/models/MODEL/load``: load it (waits until ready, ``?wait=0`` not);
  returns 200 when loaded, 202 when still loading, 503 with the reason if it failed.
- ``POST /api/v1/models/MODEL/unload``: drain every instance of it, then stop them;
  requests in flight finish first (bounded by ``drain_timeout``; 409 if they don't).
- ``POST /api/v1/models/rescan``: scan the model folders now; says what was added
  and removed.
- ``POST /api/v1/config/reload``: re-read the config file; only the models whose
  settings changed are unloaded (drained) and load again with the new settings on
  their next request.

Their answers and query parameters are typed in :mod:`corral.control.api_schema`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral.control.api_schema import (
    LOAD_WAIT_S,
    BadInput,
    HostsList,
    LoadAnswer,
    LoadQuery,
    ModelsList,
    ReloadAnswer,
    RescanAnswer,
    UnloadAnswer,
    parse_query,
    reply,
)
from corral.gateway.errors import error_body, error_response
from corral.hosting import LoadRefused

if TYPE_CHECKING:
    from corral.hosting import Host

log = logging.getLogger(__name__)


class ModelAdmin:
    def __init__(self, host: Callable[[], Host | None]) -> None:
        self._host = host
        self.reload: Callable[[], Any] | None = None
        """Set by ``corral serve``: re-reads the config file and returns what changed."""

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/models", self.list)
        router.add_post("/api/v1/models/rescan", self.rescan)
        router.add_post("/api/v1/models/{model}/load", self.load)
        router.add_post("/api/v1/models/{model}/unload", self.unload)
        router.add_post("/api/v1/config/reload", self.reload_config)
        router.add_get("/api/v1/hosts", self.hosts)

    def host(self) -> Host:
        host = self._host()
        if host is None:
            message = (
                "this balancer has no model host: models are loaded by `corral serve`; "
                "remote agents start their own"
            )
            raise web.HTTPNotImplemented(
                text=json.dumps(error_body(501, message)), content_type="application/json"
            )
        return host

    async def list(self, request: web.Request) -> web.Response:
        host = self.host()
        problems = [str(p) for p in host.catalog.problems]
        return reply(ModelsList.model_validate({"models": host.status(), "problems": problems}))

    async def hosts(self, request: web.Request) -> web.Response:
        return reply(HostsList.model_validate({"hosts": self.host().hosts()}))

    async def load(self, request: web.Request) -> web.Response:
        host = self.host()
        name = request.match_info["model"]
        try:
            query = parse_query(LoadQuery, request)
        except BadInput as exc:
            return error_response(400, str(exc))
        try:
            key = host.load(name, query.host)
        except LoadRefused as exc:
            return error_response(404, str(exc), "not_found_error")
        if not query.wait:
            return reply(LoadAnswer(model=key, state="loading"), 202)
        if await host.wait_loaded(key, LOAD_WAIT_S):
            return reply(LoadAnswer(model=key, state="loaded"))
        error = host.last_error.get(key)
        if error:
            return error_response(503, error)
        return reply(LoadAnswer(model=key, state="loading"), 202)

    async def unload(self, request: web.Request) -> web.Response:
        host = self.host()
        name = request.match_info["model"]
        if host.resolve(name) is None:
            return error_response(404, f"unknown model {name!r}", "not_found_error")
        drained = await host.unload(name)
        if not drained:
            return error_response(
                409,
                f"model {name!r} still had requests in flight after "
                f"{host.drain_timeout:g} s (drain_timeout); it keeps serving",
            )
        return reply(UnloadAnswer(model=name, state="unloaded"))

    async def rescan(self, request: web.Request) -> web.Response:
        host = self.host()
        change = host.catalog.apply(await asyncio.to_thread(host.catalog.scan_folders))
        return reply(
            RescanAnswer(
                added=[m.id for m in change.added],
                removed=[m.id for m in change.removed],
                updated=[m.id for m in change.updated],
                models=[m.id for m in host.catalog.models],
            )
        )

    async def reload_config(self, request: web.Request) -> web.Response:
        self.host()
        if self.reload is None:
            return error_response(501, "this corral was started without a config file to reload")
        try:
            result = await self.reload()
        except ValueError as exc:
            return error_response(400, f"config not reloaded: {exc}")
        return reply(ReloadAnswer.model_validate(result))
