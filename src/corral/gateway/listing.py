"""The front door's own answers, for the whole fleet rather than one server.

- ``GET /health`` (and ``/v1/health``): ready when any instance is usable (503 when
  none), with the fleet's counts;
- ``GET /v1/models`` (and ``/models``): every model with router mode's
  ``status.value`` (``loaded``, ``loading``, ``unloaded``);
- ``GET /corral/slots`` with ``expose_slots``: every instance's slots (``GET /slots``
  is the instance's own, forwarded like any other route).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from corral.gateway.proxy import Gateway

#: The fleet's slots on the inference port, with ``expose_slots`` (the management
#: API's ``/api/v1/instances`` has them always); ``/slots`` is llama-server's own.
SLOTS_AGGREGATE = "/corral/slots"


class ListingRoutes:
    """The listing routes on the gateway's app; see the module doc."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        for path in ("/health", "/v1/health"):
            gateway.route("GET", path, self.health, public=True)
        for path in ("/v1/models", "/models"):
            gateway.route("GET", path, self.models)
        if gateway.options.expose_slots:
            gateway.route("GET", SLOTS_AGGREGATE, self.slots)

    async def health(self, request: web.Request) -> web.Response:
        now = self.gateway.scheduler.clock()
        usable = [i for i in self.gateway.scheduler.fleet.instances.values() if i.usable(now)]
        body = {
            "status": "ok" if usable else "unavailable",
            "instances_ready": len(usable),
            "instances_total": len(self.gateway.scheduler.fleet.instances),
            "slots_free": sum(i.free_slots for i in usable),
            "slots_busy": sum(i.busy_slots for i in usable),
            "buffered": self.gateway.scheduler.buffered(),
        }
        return web.json_response(body, status=200 if usable else 503)

    async def models(self, request: web.Request) -> web.Response:
        """Every model with its state, in the shape llama-server's router mode uses:
        ``status.value`` is ``loaded``, ``loading`` or ``unloaded``."""
        data: list[dict[str, Any]] = []
        seen: set[str] = set()
        now = self.gateway.scheduler.clock()
        if self.gateway.host is not None:
            for row in self.gateway.host.status():
                if row["unlisted"]:
                    continue
                seen.add(row["id"])
                pool = self.gateway.scheduler.fleet.pool(row["id"])
                n_ctx = max((i.n_ctx for i in pool), default=0)
                state = row["state"]
                if state == "loaded" and not any(i.usable(now) for i in pool):
                    state = "loading"  # restarting: it will be back
                data.append(
                    {
                        "id": row["id"],
                        "object": "model",
                        "created": row["created"],
                        "owned_by": "corral",
                        "aliases": row["aliases"],
                        "status": {
                            "value": "unloaded" if state == "unloading" else state,
                            "args": row["args"],
                            "instances": len(pool),
                        },
                        "meta": {
                            "n_ctx": n_ctx,
                            "n_ctx_train": row["context_length"],
                            "size": row["size_bytes"],
                            "quantization": row["quantization"],
                        },
                    }
                )
        for instance in sorted(self.gateway.scheduler.fleet.instances.values(), key=lambda i: i.id):
            if instance.model in seen or (
                self.gateway.host and self.gateway.host.resolve(instance.model)
            ):
                continue  # listed above, or a per-request-flags variant of a listed model
            seen.add(instance.model)
            pool = self.gateway.scheduler.fleet.pool(instance.model)
            data.append(
                {
                    "id": instance.model,
                    "object": "model",
                    "created": int(instance.started_at),
                    "owned_by": "corral",
                    "aliases": instance.aliases,
                    "status": {
                        "value": "loaded" if any(i.usable(now) for i in pool) else "loading",
                        "instances": len(pool),
                    },
                    "meta": {"n_ctx": instance.n_ctx},
                }
            )
        return web.json_response({"object": "list", "data": data})

    async def slots(self, request: web.Request) -> web.Response:
        return web.json_response(
            [i.as_dict() for i in self.gateway.scheduler.fleet.instances.values()]
        )
