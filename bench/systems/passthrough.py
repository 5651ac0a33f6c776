"""A bare aiohttp pass-through proxy: the floor for any Python/aiohttp hop.

Not a product: about thirty lines that read the request, send it upstream over a
pooled ``aiohttp.ClientSession`` and relay the response chunk by chunk, on uvloop,
with no access log, no scheduling, no metrics, no retries. A connection that carries
a stream is marked ``force_close`` as soon as the response head arrives: llama-server
closes it after the stream, and aiohttp would otherwise put it back in the pool at
end of body (calling ``close()`` afterwards is too late), where the next request
finds it dead. Measured beside corral it
shows how much of corral's added latency is the cost of one aiohttp server + client
hop on this machine, and how much is corral's own work.

Run as ``python -m bench.systems.passthrough UPSTREAM_URL PORT``.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

from bench.context import BenchContext, wait_healthy
from bench.procs import ManagedProcess, free_port
from bench.systems.base import Endpoint, System, start_llama_server


async def serve(upstream: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up = await session.request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            data=body or None,
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        )
        if up.content_type == "text/event-stream" and up.connection is not None:
            protocol = up.connection.protocol
            if protocol is not None:
                protocol.force_close()  # aiohttp pools it at EOF otherwise
        response = web.StreamResponse(status=up.status)
        response.content_type = up.content_type
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        up.release()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


class Passthrough(System):
    name = "passthrough"
    label = "aiohttp pass-through (reference)"

    async def start(self, ctx: BenchContext) -> Endpoint:
        backend = await start_llama_server(self, ctx, "passthrough-llama-server")
        port = free_port()
        args = [sys.executable, "-m", "bench.systems.passthrough", backend, str(port)]
        proc = self.spawn(ManagedProcess("passthrough", args, ctx.log_path("passthrough")))
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(f"{url}/health", what="pass-through → llama-server", proc=proc)
        return Endpoint(url=url, backend_url=backend, model=ctx.model_name)

    def version(self, ctx: BenchContext) -> str:
        return f"aiohttp {aiohttp.__version__} on uvloop"

    def setup(self, ctx: BenchContext) -> str:
        return (
            "`bench/systems/passthrough.py`: read body, pooled upstream request, relay "
            "chunks; no log, no scheduling (not in the brief: shows the cost of one "
            "aiohttp hop)"
        )


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1].rstrip("/"), int(sys.argv[2])))
