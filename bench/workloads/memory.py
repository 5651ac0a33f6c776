"""Workload "memory": corral's resident memory with 1,000 concurrent streams.

The issue's target: the balancer's RSS stays under 100 MB with 1,000 concurrent
streams. A real llama-server on this machine cannot hold 1,000 streams, so corral runs
in front of corral's fake llama-server (``corral.testing.fake_llama_server``) with
``--parallel 1000`` (1,000 slots), 200 tokens per completion and 50 ms per token: each
stream stays open about 10 s. Two set-ups, one after the other: ``corral balancer``
with a ``corral agent`` and the fake in their own processes (what the target names),
and ``corral serve`` with the fake as its llama-server binary (everything in one
process, the catalog's gguf/numpy included). Only the balancer's or serve's own
process is measured (psutil RSS of its pid, children excluded).

Phases: idle after start (and a few warm-up requests), peak while 1,000 streaming chat
completions are open (started over a ramp, RSS sampled every 0.2 s, the maximum
kept), and after they have all finished. The load generator holds 1,000 connections
from one aiohttp session (``TCPConnector(limit=0)``); the bench raises its
``RLIMIT_NOFILE`` soft limit to the hard limit before starting corral, which inherits it
(corral needs a descriptor per client and per upstream connection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import secrets
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench.context import BenchContext, StartupError, wait_healthy
from bench.fleet import Processes, start_corral
from bench.loadgen import chat_request
from bench.procs import ManagedProcess, free_port
from bench.report import md_table
from bench.systems.corral import Corral, corral_command, serve_env
from bench.workloads import Section

log = logging.getLogger("bench.memory")

NAME = "memory"
TITLE = "Memory: corral's RSS with 1,000 concurrent streams"
ORDER = 30

STREAMS = 1000
TOKENS = 200
TOKEN_DELAY = 0.05
#: seconds over which the streams are started
RAMP = 2.0
SAMPLE_EVERY = 0.2
#: seconds of quiet before the idle and the after samples
SETTLE = 2.0
WARMUP = 5
TARGET_MB = 100.0
MAX_BUFFERED = 2000
STREAM_LIMIT = 90.0
FAKE_ARGS = ("--token-delay", str(TOKEN_DELAY), "--tokens", str(TOKENS), "--log-level", "WARNING")
LLAMA_ARGS = ("--parallel", str(STREAMS), "--ctx-size", str(STREAMS * 1024))

MB = 1024 * 1024


@dataclass
class Outcome:
    nofile_before: tuple[int, int] = (0, 0)
    nofile: tuple[int, int] = (0, 0)
    idle: int = 0
    peak: int = 0
    peak_open: int = 0
    after: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    max_open: int = 0
    wall: float = 0.0
    children_rss: int = 0


def raise_nofile() -> tuple[tuple[int, int], tuple[int, int]]:
    """Raise this process's descriptor soft limit to its hard limit (children inherit it)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE: %s", exc)
    return before, resource.getrlimit(resource.RLIMIT_NOFILE)


def write_fake(path: os.PathLike[str] | str) -> str:
    """An executable that runs the fake llama-server with this workload's delays."""
    text = (
        f"#!{sys.executable}\n"
        "import sys\n\n"
        "from corral.testing.fake_llama_server import main\n\n"
        f"sys.exit(main([*sys.argv[1:], *{list(FAKE_ARGS)!r}]))\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


class _Counter:
    def __init__(self) -> None:
        self.open = 0
        self.max_open = 0


async def _stream(
    session: aiohttp.ClientSession, url: str, body: object, counter: _Counter
) -> str | None:
    """One streamed chat completion read to ``[DONE]``; None when it ended well."""
    opened = False
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                await response.read()
                return f"http {response.status}"
            counter.open += 1
            opened = True
            counter.max_open = max(counter.max_open, counter.open)
            done = False
            async for line in response.content:
                if line.strip() == b"data: [DONE]":
                    done = True
            return None if done else "no [DONE]"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return type(exc).__name__
    finally:
        if opened:
            counter.open -= 1


async def _start_serve(
    ctx: BenchContext, work: Path, procs: list[ManagedProcess]
) -> tuple[str, int]:
    """``corral serve`` with the fake as its llama-server; (inference URL, corral's pid)."""
    fake = write_fake(work / "fake-llama-server")
    inference, management = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    args = [
        *corral_command(),
        "serve",
        "--model",
        str(ctx.model),
        "--llama-server",
        fake,
        "--inference-addr",
        f"127.0.0.1:{inference}",
        "--management-addr",
        f"127.0.0.1:{management}",
        "--max-buffered-requests",
        str(MAX_BUFFERED),
        "--",
        *LLAMA_ARGS,
    ]
    proc = ManagedProcess("corral-memory", args, ctx.log_path("corral-memory"))
    proc.env = {**os.environ, **serve_env(ctx, token)}
    procs.append(proc.start())
    base = f"http://127.0.0.1:{inference}"
    await wait_healthy(f"{base}/health", what="corral /health 200", proc=proc, within=60)
    await Corral()._instance_url(management, token, proc)
    return base, proc.pid


async def _start_balancer(
    ctx: BenchContext, work: Path, procs: list[ManagedProcess]
) -> tuple[str, int]:
    """``corral balancer`` with one ``corral agent`` watching the fake, each its own
    process; (inference URL, the balancer's pid)."""
    fake_port = free_port()
    fake = ManagedProcess(
        "memory-fake",
        [
            sys.executable,
            "-m",
            "corral.testing.fake_llama_server",
            "--port",
            str(fake_port),
            "--alias",
            ctx.model_name,
            *LLAMA_ARGS,
            *FAKE_ARGS,
        ],
        ctx.log_path("memory-fake"),
    )
    procs.append(fake.start())
    base = f"http://127.0.0.1:{fake_port}"
    await wait_healthy(f"{base}/health", what="fake llama-server /health", proc=fake)
    fleet = Processes()
    try:
        url, _ = await start_corral(
            ctx,
            fleet,
            "memory-balancer",
            "least_busy",
            [base],
            balancer_args=["--max-buffered-requests", str(MAX_BUFFERED)],
        )
    finally:
        procs.extend(fleet.procs)  # stopped with the rest
    return url, fleet.procs[0].pid  # the balancer: start_corral spawns it first


SETUPS = {"balancer": _start_balancer, "serve": _start_serve}
LABELS = {
    "balancer": "`corral balancer`, with its agent and llama-server in their own processes",
    "serve": "`corral serve`, balancer, host and supervisor in one process",
}


async def measure(ctx: BenchContext, out: Outcome, setup: str) -> None:
    out.nofile_before, out.nofile = raise_nofile()
    work = ctx.run_dir / f"memory-{setup}"
    work.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    try:
        base, pid = await SETUPS[setup](ctx, work, procs)
        me = psutil.Process(pid)
        url = f"{base}/v1/chat/completions"
        body = chat_request(ctx.model_name, stream=True, max_tokens=TOKENS).body
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=STREAM_LIMIT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            warm = _Counter()
            small = chat_request(ctx.model_name, stream=True, max_tokens=4).body
            warmed = [_stream(session, url, small, warm) for _ in range(WARMUP)]
            for err in await asyncio.gather(*warmed):
                if err is not None:
                    raise StartupError(f"warm-up stream failed: {err}")
            await asyncio.sleep(SETTLE)
            out.idle = _rss(me)
            log.info("idle RSS %.1f MB", out.idle / MB)
            counter = _Counter()
            stop = asyncio.Event()
            started = time.monotonic()

            async def sample() -> None:
                while not stop.is_set():
                    rss = _rss(me)
                    out.samples.append((time.monotonic() - started, rss, counter.open))
                    if rss > out.peak:
                        out.peak, out.peak_open = rss, counter.open
                    try:
                        await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
                    except TimeoutError:
                        pass

            sampler = asyncio.create_task(sample())
            tasks = []
            for i in range(STREAMS):
                tasks.append(asyncio.create_task(_stream(session, url, body, counter)))
                if (i + 1) % 50 == 0:
                    await asyncio.sleep(RAMP * 50 / STREAMS)
            results = await asyncio.gather(*tasks)
            out.wall = time.monotonic() - started
            stop.set()
            await sampler
        out.max_open = counter.max_open
        out.ok = sum(1 for r in results if r is None)
        for r in results:
            if r is not None:
                out.errors[r] = out.errors.get(r, 0) + 1
        with_children = [_rss(c) for c in me.children(recursive=True)]
        out.children_rss = sum(with_children)
        await asyncio.sleep(SETTLE)
        out.after = _rss(me)
        log.info(
            "peak RSS %.1f MB (%d open), after %.1f MB; ok %d, errors %s, max open %d",
            out.peak / MB,
            out.peak_open,
            out.after / MB,
            out.ok,
            out.errors,
            out.max_open,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()


async def run(ctx: BenchContext) -> Section:
    outcomes: dict[str, Outcome] = {}
    failures: dict[str, str] = {}
    missing: dict[str, str] = {}
    for setup in SETUPS:
        out = Outcome()
        try:
            await measure(ctx, out, setup)
            outcomes[setup] = out
        except (StartupError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.error("memory workload (%s) failed: %s", setup, exc)
            failures[setup] = str(exc)
            missing[f"corral {setup}"] = f"could not be measured: {exc}"
    return Section(TITLE, render(outcomes, failures), [], missing)


def _mb(n: int) -> str:
    return f"{n / MB:.1f}" if n else "-"


def render(outcomes: dict[str, Outcome], failures: dict[str, str] | None = None) -> str:
    failures = failures or {}
    fake_cmd = f"python -m corral.testing.fake_llama_server {shlex.join(FAKE_ARGS)}"
    parts = [
        "Two ways to run corral in front of corral's fake llama-server with "
        f"`{shlex.join(LLAMA_ARGS)}` (1,000 slots) and `{shlex.join(FAKE_ARGS)}` "
        f"({TOKENS} tokens per completion at {TOKEN_DELAY * 1000:.0f} ms each):",
        "",
        f"- **balancer**: `corral balancer --max-buffered-requests {MAX_BUFFERED}`, one "
        f"`corral agent` beside the fake (`{fake_cmd} --port P --alias tiny "
        f"{shlex.join(LLAMA_ARGS)}`), each its own process, as on a fleet of hosts;",
        f"- **serve**: `corral serve --model tiny.gguf --llama-server FAKE "
        f"--max-buffered-requests {MAX_BUFFERED} -- {shlex.join(LLAMA_ARGS)}`, where FAKE "
        "is an executable running the fake with those delays: balancer, agent, "
        "supervisor and the model catalog (which reads GGUF metadata with `gguf`, and "
        "so loads numpy) in one process.",
        "",
        f"{STREAMS:,} streaming chat completions (`max_tokens: {TOKENS}`) are started over "
        f"{RAMP:g} s from one aiohttp session (`TCPConnector(limit=0)`, one connection per "
        "stream) and each is read to `data: [DONE]`. RSS is the corral process's own "
        "(psutil `memory_info().rss` of the balancer's or serve's pid; the fake and the "
        f"agent are not counted): idle {SETTLE:g} s after {WARMUP} concurrent warm-up "
        f"streams, the maximum of samples taken every {SAMPLE_EVERY:g} s while the "
        f"streams run, and {SETTLE:g} s after the last one finished. 1 MB = 2^20 bytes.",
        "",
    ]
    for setup, failure in failures.items():
        parts += [f"Not measured ({setup}): {failure}", ""]
    setups = [s for s in SETUPS if s in outcomes]
    if not setups:
        return "\n".join(parts).rstrip() + "\n"
    rows = [
        ["idle (after start)", *(_mb(outcomes[s].idle) for s in setups)],
        [f"peak under {STREAMS:,} streams", *(_mb(outcomes[s].peak) for s in setups)],
        ["after the streams finished", *(_mb(outcomes[s].after) for s in setups)],
    ]
    parts += [md_table(["RSS (MB)", *(f"corral {s}" for s in setups)], rows), ""]
    stream_rows = []
    for setup in setups:
        out = outcomes[setup]
        errors = ", ".join(f"{k} {n}" for k, n in out.errors.items()) or "0"
        stream_rows.append(
            [
                f"corral {setup}",
                f"{STREAMS:,}",
                str(out.ok),
                errors,
                str(out.max_open),
                str(out.peak_open),
                f"{out.wall:.1f}",
            ]
        )
    parts += [
        md_table(
            [
                "setup",
                "streams",
                "completed OK",
                "errors",
                "most open at once",
                "open at peak",
                "wall (s)",
            ],
            stream_rows,
        ),
        "",
        "### Target",
        "",
    ]
    for setup in setups:
        out = outcomes[setup]
        met = out.peak < TARGET_MB * MB and out.max_open >= STREAMS and out.ok == STREAMS
        verdict = "met" if met else "**not met**"
        subject = "what the target names" if setup == "balancer" else "stricter than asked"
        parts.append(
            f"- {LABELS[setup]} ({subject}): RSS < {TARGET_MB:.0f} MB with {STREAMS:,} "
            f"concurrent streams: {verdict} (peak {_mb(out.peak)} MB, {out.max_open:,} "
            "streams open at once at most)."
        )
    parts.append("")
    first = outcomes[setups[0]]
    soft0, hard0 = first.nofile_before
    soft = first.nofile[0]
    parts += [
        f"Descriptor limit (`RLIMIT_NOFILE`) of the bench, inherited by corral: soft {soft0} "
        f"(hard {hard0}) before, {soft} during the run. corral needs about two descriptors "
        "per stream (client and upstream sockets); with a soft limit of 1024 it could not "
        "hold 1,000 streams.",
        "",
    ]
    serve = outcomes.get("serve")
    if serve is not None and serve.children_rss:
        parts += [
            f"For scale: `corral serve`'s child (the fake llama-server) used "
            f"{_mb(serve.children_rss)} MB at the end of its run; not part of the figures "
            "above.",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"
