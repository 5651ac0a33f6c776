"""Workload "fleet": six models on three hosts, Zipf-skewed demand with one burst.

Three hosts, each with room for two llama-servers and all six tiny models in its folder
(different seeds), through three front doors, one after the other in one run:

- **corral fleet**: ``corral balancer`` and three model hosts (``corral agent
  --models-dir DIR --max-instances 2``): the balancer picks the host for each load;
- **router mode + LiteLLM**: three ``llama-server --models-dir DIR --models-max 2``
  behind LiteLLM, every model a group over the three routers (``simple-shuffle``):
  what users assemble today;
- **corral serve + nginx**: three ``corral serve --models-dir DIR --max-instances 2``
  behind nginx round robin.

The same request plan for each: Poisson arrivals, each request's model drawn from a
Zipf distribution over the six (s = 1.1, so the first model is asked for most), and a
burst of requests at once halfway through; streamed chat completions of 8 tokens.
Reported: failed requests, time to first token, llama-server starts (loads) and
evictions counted in each system's logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from bench.context import BenchContext, StartupError, wait_until
from bench.fleet import Processes
from bench.loadgen import LoadGenerator, RequestResult, RunResult, chat_request
from bench.procs import ManagedProcess, free_port
from bench.report import md_table
from bench.stats import percentile
from bench.systems import litellm, nginx
from bench.systems.corral import corral_command
from bench.workloads import Section

log = logging.getLogger("bench.fleet")

NAME = "fleet"
TITLE = "One fleet: six models on three hosts, Zipf demand and a burst"
ORDER = 27

MODELS = tuple(f"m{i}" for i in range(1, 7))
HOSTS = 3
ROOM = 2  # llama-servers per host
RATE = 2.0  # requests a second
COUNT = 90
BURST = 16
ZIPF_S = 1.1
MAX_TOKENS = 8
REQUEST_LIMIT = 120.0

SYSTEMS = {
    "corral-fleet": "corral fleet (balancer + 3 model hosts)",
    "corral-fleet-min1": "corral fleet, replicas.min 1 (each model kept loaded)",
    "corral-fleet-replicas": "corral fleet, replicas.max 3, replica_wait 0.5 s",
    "router-litellm": "router mode x3 + LiteLLM",
    "serve-nginx": "corral serve x3 + nginx round robin",
}


@dataclass
class Outcome:
    run: RunResult = field(default_factory=RunResult)
    loads: int = 0
    evictions: int = 0


def _folder(ctx: BenchContext) -> Path:
    from corral.catalog.tiny import make_tiny_model

    folder = ctx.run_dir / "fleet-models"
    for index, name in enumerate(MODELS):
        if not (folder / f"{name}.gguf").is_file():
            make_tiny_model(folder / f"{name}.gguf", seed=10 + index, name=name)
    return folder


def _plan(count: int, seed: int = 7) -> list[str]:
    """Each request's model: Zipf over MODELS (the first most asked for)."""
    rng = random.Random(seed)
    weights = [1 / (rank**ZIPF_S) for rank in range(1, len(MODELS) + 1)]
    return rng.choices(MODELS, weights=weights, k=count)


def _config(ctx: BenchContext, name: str, extra: str = "") -> Path:
    path = ctx.run_dir / f"{name}.yaml"
    args = ", ".join(f'"{a}"' for a in ctx.llama_args)
    path.write_text(f"llama_args: [{args}]\n{extra}")
    return path


def _env(ctx: BenchContext, name: str) -> dict[str, str]:
    state = ctx.run_dir / f"state-{name}"
    state.mkdir(parents=True, exist_ok=True)
    return {
        "CORRAL_MANAGEMENT_TOKEN": "bench-" + secrets.token_hex(8),
        "CORRAL_CLUSTER_TOKEN": "bench-cluster",
        "CORRAL_STATE_DIR": str(ctx.run_dir / "state-fleet"),  # shared: port leases
    }


async def _listed(url: str, headers: dict[str, str] | None = None) -> set[str]:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/v1/models", headers=headers or {}) as response,
        ):
            if response.status != 200:
                return set()
            return {m["id"] for m in (await response.json())["data"]}
    except (aiohttp.ClientError, OSError, ValueError, KeyError):
        return set()


async def _start_corral_fleet(
    ctx: BenchContext,
    procs: Processes,
    folder: Path,
    keep: bool = False,
    spread: bool = False,
) -> tuple[str, dict[str, str], list[Path]]:
    inference, management = free_port(), free_port()
    env = _env(ctx, "fleet")
    wanted = "{min: 1, max: 1}" if keep else "{min: 0, max: 3}"
    policies = "".join(f"  {m}: {{replicas: {wanted}}}\n" for m in MODELS)
    extra = f"models:\n{policies}" if keep or spread else ""
    if spread:
        extra += "replica_wait: 0.5\nreplica_idle: 30\n"
    balancer_config = _config(ctx, "fleet-balancer", extra)
    balancer = procs.spawn(
        ManagedProcess(
            "fleet-balancer",
            [
                *corral_command(),
                "balancer",
                "--config",
                str(balancer_config),
                "--inference-addr",
                f"127.0.0.1:{inference}",
                "--management-addr",
                f"127.0.0.1:{management}",
            ],
            ctx.log_path("fleet-balancer"),
            env=env,
        )
    )
    config = _config(ctx, "fleet-host")
    for index in range(HOSTS):
        procs.spawn(
            ManagedProcess(
                f"fleet-host-{index}",
                [
                    *corral_command(),
                    "agent",
                    "--config",
                    str(config),
                    "--models-dir",
                    str(folder),
                    "--balancer",
                    f"127.0.0.1:{management}",
                    "--max-instances",
                    str(ROOM),
                    "--llama-server",
                    str(ctx.llama_server),
                    "--name",
                    f"host-{index}",
                ],
                ctx.log_path(f"fleet-host-{index}"),
                env=env,
            )
        )
    url = f"http://127.0.0.1:{inference}"

    async def offered() -> bool:
        return await _listed(url) == set(MODELS)

    await wait_until(offered, what="the fleet's six models", within=60, proc=balancer)
    await asyncio.sleep(1.5)  # every host has reported
    if keep:

        async def all_loaded() -> bool:
            return _count([balancer.log_path], "corral.supervisor.host loaded model=") >= 6

        await wait_until(all_loaded, what="the six models kept loaded", within=60, proc=balancer)
    return url, {}, [balancer.log_path]


async def _start_corral_fleet_kept(
    ctx: BenchContext, procs: Processes, folder: Path
) -> tuple[str, dict[str, str], list[Path]]:
    return await _start_corral_fleet(ctx, procs, folder, keep=True)


async def _start_corral_fleet_spread(
    ctx: BenchContext, procs: Processes, folder: Path
) -> tuple[str, dict[str, str], list[Path]]:
    return await _start_corral_fleet(ctx, procs, folder, spread=True)


async def _start_router_litellm(
    ctx: BenchContext, procs: Processes, folder: Path
) -> tuple[str, dict[str, str], list[Path]]:
    litellm.ensure_installed()
    backends, logs = [], []
    for index in range(HOSTS):
        port = free_port()
        proc = procs.spawn(
            ManagedProcess(
                f"fleet-router-{index}",
                [
                    str(ctx.llama_server),
                    "--models-dir",
                    str(folder),
                    "--models-max",
                    str(ROOM),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *ctx.llama_args,
                ],
                ctx.log_path(f"fleet-router-{index}"),
            )
        )
        backends.append(f"http://127.0.0.1:{port}")
        logs.append(proc.log_path)

        async def up(base: str = backends[-1]) -> bool:
            return bool(await _listed(base))

        await wait_until(up, what=f"router {index}", within=60, proc=proc)
    url, headers = await litellm.start_proxy(
        ctx, "fleet-litellm", list(MODELS), backends, procs.spawn
    )
    return url, headers, logs


async def _start_serve_nginx(
    ctx: BenchContext, procs: Processes, folder: Path
) -> tuple[str, dict[str, str], list[Path]]:
    if nginx.nginx_binary() is None:
        raise StartupError("nginx is not installed (`apt-get install -y nginx`)")
    backends, logs = [], []
    config = _config(ctx, "fleet-serve")
    for index in range(HOSTS):
        port = free_port()
        proc = procs.spawn(
            ManagedProcess(
                f"fleet-serve-{index}",
                [
                    *corral_command(),
                    "serve",
                    "--config",
                    str(config),
                    "--models-dir",
                    str(folder),
                    "--max-instances",
                    str(ROOM),
                    "--llama-server",
                    str(ctx.llama_server),
                    "--inference-addr",
                    f"127.0.0.1:{port}",
                    "--management-addr",
                    f"127.0.0.1:{free_port()}",
                ],
                ctx.log_path(f"fleet-serve-{index}"),
                env=_env(ctx, f"serve-{index}"),
            )
        )
        backends.append(f"http://127.0.0.1:{port}")
        logs.append(proc.log_path)

        async def up(base: str = backends[-1]) -> bool:
            return await _listed(base) == set(MODELS)

        await wait_until(up, what=f"corral serve {index}", within=60, proc=proc)
    prefix = ctx.run_dir / "fleet-nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx.proxy_config(prefix, backends, port), encoding="utf-8")
    proc = procs.spawn(
        ManagedProcess("fleet-nginx", nginx.nginx_args(prefix, conf), ctx.log_path("fleet-nginx"))
    )
    url = f"http://127.0.0.1:{port}"

    async def through() -> bool:
        return await _listed(url) == set(MODELS)

    await wait_until(through, what="nginx → corral serve", within=30, proc=proc)
    return url, {}, logs


STARTERS = {
    "corral-fleet": _start_corral_fleet,
    "corral-fleet-min1": _start_corral_fleet_kept,
    "corral-fleet-replicas": _start_corral_fleet_spread,
    "router-litellm": _start_router_litellm,
    "serve-nginx": _start_serve_nginx,
}

#: (the line each system logs per llama-server it starts, per eviction) in its logs
LINES = {
    "corral-fleet": ("corral.supervisor.host loading model=", "reason=making room"),
    "corral-fleet-min1": ("corral.supervisor.host loading model=", "reason=making room"),
    "corral-fleet-replicas": ("corral.supervisor.host loading model=", "reason=making room"),
    "router-litellm": ("load: spawning server instance with name=", "unloading"),
    "serve-nginx": ("corral.supervisor.host loading model=", "reason=making room"),
}


def _count(logs: list[Path], text: str) -> int:
    return sum(path.read_text(errors="replace").count(text) for path in logs)


async def _measure(ctx: BenchContext, system: str, folder: Path) -> Outcome:
    procs = Processes()
    try:
        url, headers, logs = await STARTERS[system](ctx, procs, folder)
        count = ctx.count(COUNT, minimum=30)
        models = _plan(count)
        burst = _plan(BURST, seed=11)
        outcome = Outcome()
        loads_before = _count(logs, LINES[system][0])
        evictions_before = _count(logs, LINES[system][1])
        async with LoadGenerator(url, timeout=REQUEST_LIMIT, headers=headers) as gen:

            def make(index: int) -> object:
                return chat_request(models[index], stream=True, max_tokens=MAX_TOKENS)

            async def burst_at(delay: float) -> list[RequestResult]:
                await asyncio.sleep(delay)
                return list(
                    await asyncio.gather(
                        *(
                            gen.send(chat_request(m, stream=True, max_tokens=MAX_TOKENS))
                            for m in burst
                        )
                    )
                )

            steady, bursted = await asyncio.gather(
                gen.open_loop(make, rate=RATE, count=count, seed=3),  # type: ignore[arg-type]
                burst_at(count / RATE / 2),
            )
        outcome.run = steady
        outcome.run.results.extend(bursted)
        slowest = sorted(outcome.run.results, key=lambda r: -(r.ttft or r.latency))[:5]
        log.info(
            "fleet: %s slowest: %s",
            system,
            ", ".join(f"sent {r.sent:.1f}s ttft {(r.ttft or 0):.2f}s" for r in slowest),
        )
        await asyncio.sleep(0.5)  # the last lines reach the logs
        outcome.loads = _count(logs, LINES[system][0]) - loads_before
        outcome.evictions = _count(logs, LINES[system][1]) - evictions_before
        return outcome
    finally:
        procs.stop()


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


async def run(ctx: BenchContext) -> Section:
    folder = _folder(ctx)
    chosen = os.environ.get("CORRAL_BENCH_FLEET_SYSTEMS", "")  # e.g. corral-fleet
    wanted = [s for s in SYSTEMS if s in chosen.split(",")] or list(SYSTEMS)
    outcomes: dict[str, Outcome] = {}
    missing: dict[str, str] = {}
    for system in wanted:
        log.info("fleet: measuring %s", system)
        try:
            outcomes[system] = await _measure(ctx, system, folder)
        except StartupError as exc:
            missing[SYSTEMS[system]] = str(exc)
    rows = []
    for system, outcome in outcomes.items():
        results = outcome.run.results
        ttft = [r.ttft for r in results if r.ok and r.ttft is not None]
        rows.append(
            [
                SYSTEMS[system],
                str(len(results)),
                str(sum(not r.ok for r in results)),
                _ms(ttft, 50),
                _ms(ttft, 99),
                str(outcome.loads),
                str(outcome.evictions),
            ]
        )
    ratios = []
    fleet = outcomes.get("corral-fleet")
    for other in ("router-litellm", "serve-nginx"):
        if fleet is None or other not in outcomes:
            continue
        mine = [r.ttft for r in fleet.run.results if r.ok and r.ttft is not None]
        theirs = [r.ttft for r in outcomes[other].run.results if r.ok and r.ttft is not None]
        if mine and theirs:
            p99 = percentile(theirs, 99) / percentile(mine, 99)
            p50 = percentile(theirs, 50) / percentile(mine, 50)
            ratios.append(
                f"- against {SYSTEMS[other]}: TTFT p99 {p99:.2f}x lower, p50 {p50:.2f}x; "
                f"loads {fleet.loads} vs {outcomes[other].loads}"
            )
    errors = [
        f"- {SYSTEMS[s]}: {r.status} {r.error or ''}"[:200]
        for s, o in outcomes.items()
        for r in o.run.results
        if not r.ok
    ][:10]
    markdown = (
        f"Three hosts with room for {ROOM} llama-servers each and all six tiny models; "
        f"{ctx.count(COUNT, minimum=30)} streamed requests (8 tokens) at {RATE:g}/s "
        f"(Poisson), models drawn Zipf (s = {ZIPF_S}), and a burst of {BURST} at once "
        f"halfway; llama-server `{' '.join(ctx.llama_args)}`. TTFT in ms; loads and "
        "evictions counted in each system's logs (router mode logs no eviction line we "
        "count: its column counts `unloading` lines).\n\n"
        + md_table(
            ["system", "requests", "failed", "TTFT p50", "TTFT p99", "loads", "evictions"], rows
        )
        + (
            "\n\nRatios (how many times lower corral's fleet is):\n" + "\n".join(ratios)
            if ratios
            else ""
        )
        + ("\n\nFailed requests (first 10):\n" + "\n".join(errors) if errors else "")
    )
    return Section(TITLE, markdown, missing=missing)
