"""Workload "swapping": two models, room for one, requests alternating between them.

Two tiny GGUF models (different seeds, the bench's shape) sit in one folder. Each
system may run one llama-server at a time, so every switch between the models is a
swap: stop one server, start the other.

- corral: ``corral serve --models-dir DIR --max-instances 1`` with the bench's
  llama-server arguments as ``llama_args``;
- llama-server router mode: ``llama-server --models-dir DIR --models-max 1`` with the
  same arguments (the children inherit them).

Two phases, the same for both, in one run:

1. **Sequential swaps**: A, B, A, B ... one request at a time. Every request needs a
   swap, so its latency is the swap latency as a client sees it (unload + load +
   a 4-token answer).
2. **Concurrent alternating**: requests alternate A, B, A, B ... with 8 in flight at
   once (closed loop). A system that swaps per request thrashes; one that batches
   serves the waiting requests of a model together. Reported: failed requests (any
   non-200 or an error in the body), total time, loads (llama-server starts counted in
   each system's own log) and request latency.

llama-swap is not available on this machine; it is listed as not measured.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.context import BenchContext, StartupError, wait_healthy
from bench.loadgen import LoadGenerator, RequestResult, chat_request
from bench.procs import ManagedProcess, free_port
from bench.report import md_table
from bench.stats import percentile
from bench.systems.corral import Corral, corral_command, serve_env
from bench.systems.router import Router, router_args
from bench.workloads import Section

log = logging.getLogger("bench.swapping")

NAME = "swapping"
TITLE = "Swapping: two models, room for one, alternating requests"
ORDER = 25

MODELS = ("alpha", "beta")
SEQUENTIAL = 20
CONCURRENT = 96
CONCURRENCY = 8
MAX_TOKENS = 4
REQUEST_LIMIT = 120.0

#: the line each system logs once per llama-server it starts
LOAD_LINES = {
    "corral": "corral.supervisor.host loading model=",
    "router": "load: spawning server instance with name=",
}


@dataclass
class Outcome:
    sequential: list[RequestResult] = field(default_factory=list)
    concurrent: list[RequestResult] = field(default_factory=list)
    concurrent_wall: float = 0.0
    loads_sequential: int = 0
    loads_concurrent: int = 0


def _models_dir(ctx: BenchContext) -> Path:
    from corral.catalog.tiny import make_tiny_model

    folder = ctx.run_dir / "swap-models"
    for index, name in enumerate(MODELS):
        if not (folder / f"{name}.gguf").is_file():
            make_tiny_model(folder / f"{name}.gguf", seed=index + 1, name=name)
    return folder


def _corral(ctx: BenchContext, folder: Path, port: int) -> ManagedProcess:
    config = ctx.run_dir / "swap-corral.yaml"
    args = ", ".join(f'"{a}"' for a in ctx.llama_args)
    config.write_text(f"llama_args: [{args}]\n")
    return ManagedProcess(
        "corral-swap",
        [
            *corral_command(),
            "serve",
            "--config",
            str(config),
            "--models-dir",
            str(folder),
            "--max-instances",
            "1",
            "--llama-server",
            str(ctx.llama_server),
            "--inference-addr",
            f"127.0.0.1:{port}",
            "--management-addr",
            f"127.0.0.1:{free_port()}",
        ],
        ctx.log_path("corral-swap"),
        env=serve_env(ctx, secrets.token_urlsafe(24)),
    )


def _router(ctx: BenchContext, folder: Path, port: int) -> ManagedProcess:
    args = router_args(ctx, port, folder)
    return ManagedProcess("router-swap", args, ctx.log_path("router-swap"))


def _loads(proc: ManagedProcess, system: str) -> int:
    return proc.log_path.read_text(errors="replace").count(LOAD_LINES[system])


async def _measure(ctx: BenchContext, system: str, folder: Path) -> Outcome:
    port = free_port()
    proc = (_corral if system == "corral" else _router)(ctx, folder, port).start()
    url = f"http://127.0.0.1:{port}"
    outcome = Outcome()
    try:
        if system == "corral":
            await wait_healthy(f"{url}/v1/models", what="corral /v1/models", proc=proc, within=90)
        else:
            await wait_healthy(f"{url}/health", what="router /health", proc=proc, within=90)
        async with LoadGenerator(url, timeout=REQUEST_LIMIT) as gen:
            warm = await gen.send(chat_request(MODELS[1], stream=False, max_tokens=MAX_TOKENS))
            if not warm.ok:
                raise StartupError(f"{system}: warm-up request failed: {warm.error}")
            before = _loads(proc, system)
            for index in range(ctx.count(SEQUENTIAL, minimum=6)):
                spec = chat_request(MODELS[index % 2], stream=False, max_tokens=MAX_TOKENS)
                outcome.sequential.append(await gen.send(spec))
            outcome.loads_sequential = _loads(proc, system) - before
            before = _loads(proc, system)
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one(index: int) -> RequestResult:
                spec = chat_request(MODELS[index % 2], stream=index % 4 < 2, max_tokens=MAX_TOKENS)
                async with limit:
                    return await gen.send(spec)

            started = time.perf_counter()
            count = ctx.count(CONCURRENT, minimum=24)
            outcome.concurrent = list(await asyncio.gather(*(one(i) for i in range(count))))
            outcome.concurrent_wall = time.perf_counter() - started
            await asyncio.sleep(0.5)  # let the last load lines reach the log
            outcome.loads_concurrent = _loads(proc, system) - before
    finally:
        proc.stop()
    return outcome


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


async def run(ctx: BenchContext) -> Section:
    folder = _models_dir(ctx)
    wanted = [s for s in ("corral", "router") if not ctx.systems or s in ctx.systems]
    outcomes: dict[str, Outcome] = {}
    missing = {"llama-swap": "not installable here (no Go toolchain or release download)"}
    for system in wanted:
        log.info("swapping: measuring %s", system)
        try:
            outcomes[system] = await _measure(ctx, system, folder)
        except StartupError as exc:
            missing[system] = str(exc)
    labels = {system.name: system.label for system in (Corral, Router)}
    seq_rows = []
    con_rows = []
    for system, outcome in outcomes.items():
        seq = [r.latency for r in outcome.sequential if r.ok]
        seq_rows.append(
            [
                labels[system],
                str(len(outcome.sequential)),
                str(sum(not r.ok for r in outcome.sequential)),
                str(outcome.loads_sequential),
                _ms(seq, 50),
                _ms(seq, 95),
                _ms(seq, 100),
            ]
        )
        con = [r.latency for r in outcome.concurrent if r.ok]
        con_rows.append(
            [
                labels[system],
                str(len(outcome.concurrent)),
                str(sum(not r.ok for r in outcome.concurrent)),
                str(outcome.loads_concurrent),
                f"{outcome.concurrent_wall:.2f}",
                _ms(con, 50),
                _ms(con, 95),
            ]
        )
    ratio = ""
    if {"corral", "router"} <= outcomes.keys():
        c, r = outcomes["corral"], outcomes["router"]
        c_seq = percentile([x.latency for x in c.sequential if x.ok] or [0], 50)
        r_seq = percentile([x.latency for x in r.sequential if x.ok] or [0], 50)
        ratio = (
            f"\n\nRatios (corral / router mode): sequential swap latency p50 "
            f"{c_seq / r_seq:.2f}x; concurrent total time "
            f"{c.concurrent_wall / r.concurrent_wall:.2f}x; loads in the concurrent phase "
            f"{c.loads_concurrent} vs {r.loads_concurrent}."
            if r_seq and r.concurrent_wall
            else ""
        )
    errors = [
        f"- {labels[s]}: {r.status} {r.error or ''}"[:200]
        for s, o in outcomes.items()
        for r in [*o.sequential, *o.concurrent]
        if not r.ok
    ][:10]
    markdown = (
        "Two tiny models in one folder, room for one llama-server: corral with "
        "`--max-instances 1`, router mode with `--models-max 1`, both with "
        f"`{' '.join(ctx.llama_args)}`. Latencies in ms; loads are llama-server starts "
        "counted in each system's log.\n\n"
        "**Sequential: A, B, A, B, one at a time (every request is a swap)**\n\n"
        + md_table(["system", "requests", "failed", "loads", "p50", "p95", "max"], seq_rows)
        + f"\n\n**Concurrent: alternating A, B with {CONCURRENCY} in flight**\n\n"
        + md_table(["system", "requests", "failed", "loads", "total s", "p50", "p95"], con_rows)
        + ratio
        + ("\n\nFailed requests (first 10):\n" + "\n".join(errors) if errors else "")
    )
    return Section(TITLE, markdown, missing=missing)
