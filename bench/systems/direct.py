"""llama-server alone: the limit every proxy is measured against."""

from __future__ import annotations

import shlex

from bench.context import BenchContext
from bench.procs import run_text
from bench.systems.base import Endpoint, System, start_llama_server


def llama_server_version(ctx: BenchContext) -> str:
    text = run_text([ctx.llama_server, "--version"])
    for line in text.splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return text.splitlines()[-1] if text else "unknown"


class Direct(System):
    name = "direct"
    label = "llama-server (direct)"

    async def start(self, ctx: BenchContext) -> Endpoint:
        url = await start_llama_server(self, ctx, "direct-llama-server")
        return Endpoint(url=url, backend_url=url, model=ctx.model_name)

    def version(self, ctx: BenchContext) -> str:
        return llama_server_version(ctx)

    def setup(self, ctx: BenchContext) -> str:
        return (
            f"`llama-server --model {ctx.model.name} --alias {ctx.model_name} "
            f"{shlex.join(ctx.llama_args)}`"
        )
