"""The fleet dashboard at ``/dashboard`` on the management address.

The page is static (HTML, CSS and plain JavaScript shipped inside the package, no
build step and no Node.js) and holds no data, so it is served without a token; every
piece of data it shows comes from the token-protected management API. The page takes
the management token from a login form or from the URL fragment
(``/dashboard#token=...``, which browsers never send to a server, so it cannot reach a
log), keeps it in the tab's ``sessionStorage``, removes it from the address bar, and
sends it as ``Authorization: Bearer`` on each call. Actions (load, unload, restart,
reconfigure) are ``POST`` requests with that header, which a cross-site page cannot
forge, and the page forbids framing and outside scripts (Content-Security-Policy).

Live data comes from one server-sent event stream, ``GET /api/v1/dashboard/stream``:

- ``fleet``: the whole picture (agents, instances, buffers, and the model catalog
  of a ``corral serve``), sent at once, then at most every ``FLEET_EVERY`` seconds
  while anything changes, and every ``FLEET_REFRESH`` seconds regardless;
- ``traffic``: requests, errors and latency per model over the last minutes
  (:class:`corral.observe.recent.RecentTraffic`), every ``TRAFFIC_EVERY`` seconds.

``GET /api/v1/traffic`` answers the latter once, for scripts. Both events' data are
typed in :mod:`corral.control.api_schema` (``DashboardFleetView``, ``TrafficView``).
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral.control.api_schema import DashboardFleetView, TrafficView
from corral.observe.recent import RecentTraffic

if TYPE_CHECKING:
    from corral.control.management import Management

FLEET_EVERY = 0.5
FLEET_REFRESH = 5.0
TRAFFIC_EVERY = 2.0

#: The files the page is made of, and their content types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

PUBLIC_PATHS = frozenset({"/dashboard", "/dashboard/", *(f"/dashboard/{name}" for name in ASSETS)})

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_public(path: str) -> bool:
    """The dashboard's static files: served without a token (they hold no data)."""
    return path in PUBLIC_PATHS


def _asset(name: str) -> bytes:
    return resources.files("corral").joinpath("dashboard", name).read_bytes()


class Dashboard:
    """The page's routes: static files, the live stream, and the traffic view."""

    def __init__(self, management: Management) -> None:
        self.management = management

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/dashboard", self.page)
        router.add_get("/dashboard/", self.page)
        router.add_get("/dashboard/{name}", self.asset)
        router.add_get("/api/v1/traffic", self.traffic)
        router.add_get("/api/v1/dashboard/stream", self.stream)

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text="no such dashboard file")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(
            body=_asset(name),
            headers={"Content-Type": ASSETS[name], **SECURITY_HEADERS},
        )

    def traffic_view(self) -> dict[str, Any]:
        """:class:`~corral.control.api_schema.TrafficView`: nothing recorded yet, in the
        same shape, when this management API keeps no traffic."""
        traffic = self.management.traffic or RecentTraffic()
        return TrafficView.model_validate(traffic.summary()).model_dump(mode="json")

    def fleet_view(self) -> dict[str, Any]:
        """:class:`~corral.control.api_schema.DashboardFleetView`."""
        host = self.management.host
        catalog = host.status() if host is not None else None
        hosts = host.hosts() if host is not None else None
        view = DashboardFleetView.model_validate(
            {**self.management.snapshot(), "catalog": catalog, "hosts": hosts}
        )
        return view.model_dump(mode="json", exclude_unset=True)

    async def traffic(self, request: web.Request) -> web.Response:
        return web.json_response(self.traffic_view())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.management.event_queues.add(queue)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await response.write(
                f"event: {kind}\ndata: ".encode() + json.dumps(data).encode() + b"\n\n"
            )

        try:
            loop = asyncio.get_running_loop()
            await send("fleet", self.fleet_view())
            await send("traffic", self.traffic_view())
            last_fleet = last_traffic = loop.time()
            changed = False
            while True:
                fleet_due = last_fleet + (FLEET_EVERY if changed else FLEET_REFRESH)
                traffic_due = last_traffic + TRAFFIC_EVERY
                try:
                    timeout = max(0.0, min(fleet_due, traffic_due) - loop.time())
                    event = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    pass
                else:
                    if event.get("type") == "_closing":
                        break
                    changed = True  # sent when due: many changes, one snapshot
                now = loop.time()
                if now - last_fleet >= (FLEET_EVERY if changed else FLEET_REFRESH):
                    await send("fleet", self.fleet_view())
                    last_fleet, changed = now, False
                if now - last_traffic >= TRAFFIC_EVERY:
                    await send("traffic", self.traffic_view())
                    last_traffic = now
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.management.event_queues.discard(queue)
        return response
