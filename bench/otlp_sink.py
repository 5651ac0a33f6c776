"""An OTLP/HTTP trace receiver for the bench: counts what it gets and answers at once.

``python -m bench.otlp_sink PORT``: ``POST /v1/traces`` (protobuf) decodes the batch and
counts its spans; ``GET /count`` answers ``{"spans": N, "batches": M}``. It stands in
for a collector so corral's traced run pays for real exports, not for a slow backend.
"""

from __future__ import annotations

import sys

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

COUNTS = web.AppKey("counts", dict)


async def traces(request: web.Request) -> web.Response:
    export = ExportTraceServiceRequest()
    export.ParseFromString(await request.read())
    counts = request.app[COUNTS]
    counts["batches"] += 1
    counts["spans"] += sum(
        len(scope.spans) for rs in export.resource_spans for scope in rs.scope_spans
    )
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(),
        content_type="application/x-protobuf",
    )


async def count(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


def main() -> None:
    app = web.Application()
    app[COUNTS] = {"spans": 0, "batches": 0}
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
