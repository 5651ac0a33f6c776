"""Workload "capacity": how much one proxy process relays on one core.

The question: when the servers behind it answer at once, how many requests per second
and streamed chunks per second can one corral process pass on, and how does that
compare with nginx and the LiteLLM proxy doing the same on the same core?

Set-up, on this machine's two cores:

- **core 0**: the system under test, alone (``taskset -c 0``): ``corral balancer``, or
  nginx with one worker, or the LiteLLM proxy with one worker;
- **core 1**: everything else: the upstream, the load generator (``wrk``) and, for
  corral, its ``corral agent``.

The upstream is an *instant llama-server*: nginx (one worker, with the ``echo`` module)
serving, byte for byte, what corral's fake llama-server answers (``/health``,
``/props``, ``/slots``, ``/v1/models`` and one chat completion, captured at the start
of the run; ``total_slots`` raised to :data:`SLOTS` so slots never run out). A Python
fake could not keep ahead of the proxy under test on one shared core; nginx can. Two
upstream ports:

- *non-streaming*: ``/v1/chat/completions`` answers the captured JSON at once;
- *streaming*: it answers the captured SSE stream, one event per chunk (``echo_flush``)
  with :data:`CHUNK_GAP` seconds between events, so the proxy reads and writes every
  event on its own, as it does with a real llama-server generating tokens.

Load: ``wrk`` (one thread, keep-alive connections, closed loop), a chat completion body
to ``tiny``, for :data:`DURATION` s after :data:`WARMUP` s of warm-up, at the
concurrencies in :data:`NON_STREAM_CONNECTIONS` and :data:`STREAM_CONNECTIONS`.
Streamed chunks per second are completed streams per second times the events in one
stream.

The ``direct`` row is ``wrk`` straight to the upstream, both on core 1: a check of the
set-up, not a proxy. Each proxy's CPU use over a cell is measured (100% is its whole
core), and its rate divided by that share gives what one fully busy core relays: the
fair figure where core 1 (upstream and ``wrk``), not the proxy, ran out first, as it
does for the streaming cells and for nginx on this machine.

Takes about 2.5 minutes (LiteLLM's two start-ups are a good part of it); ``--quick``
shortens each cell to 2 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench import pinning
from bench.context import BenchContext, StartupError, wait_healthy
from bench.fleet import Processes, start_corral
from bench.procs import ManagedProcess, free_port
from bench.report import md_table
from bench.stats import DASH
from bench.systems.corral import CorralBaseline
from bench.systems.litellm import (
    LITELLM_REQUIREMENT,
    ensure_installed,
    installed_version,
    start_proxy,
)
from bench.systems.nginx import nginx_args, nginx_binary, proxy_config
from bench.workloads import Section

log = logging.getLogger("bench.capacity")

NAME = "capacity"
TITLE = "Proxy capacity: one core, an instant upstream"
ORDER = 15

MODEL = "tiny"
SLOTS = 1024
TOKENS = 16
STREAM_TOKENS = 128
CHUNK_GAP = 0.002
DURATION = 5
WARMUP = 1
NON_STREAM_CONNECTIONS = (8, 64)
STREAM_CONNECTIONS = (64, 256)
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
TARGET_RPS = 3000.0
TARGET_CHUNKS = 50000.0

SYSTEMS = ("direct", "corral", "corral-base", "nginx", "litellm", "passthrough")
LABELS = {
    "direct": "no proxy (wrk → upstream)",
    "corral": "corral balancer",
    "corral-base": "corral balancer (baseline)",
    "nginx": "nginx (plain proxy)",
    "litellm": "LiteLLM proxy",
    "passthrough": "aiohttp pass-through (reference)",
}


@dataclass
class Canned:
    """What the instant upstream answers, captured from the fake llama-server."""

    props: str
    slots: str
    health: str
    models: str
    chat: str
    events: list[str]


@dataclass
class Cell:
    system: str
    stream: bool
    connections: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    cpu_percent: float | None = None
    note: str = ""

    def chunks_per_second(self, events: int) -> float:
        return self.rps * events

    def per_core(self, rate: float) -> float | None:
        """``rate`` scaled to the proxy's core busy all the time: what one core-second
        of the proxy's CPU relays (None without a CPU figure)."""
        if not self.cpu_percent:
            return None
        return rate / (self.cpu_percent / 100.0)


@dataclass
class Outcome:
    cells: list[Cell] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


async def _get(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return await response.text()


async def _capture(ctx: BenchContext) -> Canned:
    """Start corral's fake llama-server once and record what it answers."""
    import sys

    port = free_port()
    fake = ManagedProcess(
        "capacity-fake",
        [
            sys.executable,
            "-m",
            "corral.testing.fake_llama_server",
            "--port",
            str(port),
            "--alias",
            MODEL,
            "--slots",
            "4",
            "--tokens",
            str(STREAM_TOKENS),
            "--log-level",
            "WARNING",
        ],
        ctx.log_path("capacity-fake"),
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(f"{url}/health", what="fake llama-server", proc=fake)
        props = json.loads(await _get(f"{url}/props"))
        props["total_slots"] = SLOTS
        slot = json.loads(await _get(f"{url}/slots"))[0]
        slots = [{**slot, "id": index} for index in range(SLOTS)]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}]}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            short = {**body, "max_tokens": TOKENS}
            async with session.post(f"{url}/v1/chat/completions", json=short) as response:
                chat = await response.text()
            streamed = {
                **body,
                "max_tokens": STREAM_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with session.post(f"{url}/v1/chat/completions", json=streamed) as response:
                sse = await response.text()
        events = [e + "\n\n" for e in sse.split("\n\n") if e.strip()]
        return Canned(
            props=json.dumps(props, separators=(",", ":")),
            slots=json.dumps(slots, separators=(",", ":")),
            health=await _get(f"{url}/health"),
            models=await _get(f"{url}/v1/models"),
            chat=chat,
            events=events,
        )
    finally:
        fake.stop()


def _quote(text: str) -> str:
    """An nginx single-quoted string holding ``text`` exactly."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("$", "${dollar}")
    return "'" + escaped.replace("\n", "\\n") + "'"


def _upstream_config(canned: Canned, run: Path, json_port: int, sse_port: int) -> str:
    """nginx serving ``canned``: the GET answers from files (nginx limits a quoted
    string to 4 KB), the chat completion from ``return``/``echo``."""
    files = {}
    for key in ("health", "props", "slots", "models"):
        files[key] = run / f"{key}.json"
        files[key].write_text(getattr(canned, key), encoding="utf-8")

    def common(port: int, chat: str) -> str:
        return f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location = /health {{ alias {files["health"]}; }}
        location = /props {{ alias {files["props"]}; }}
        location = /slots {{ alias {files["slots"]}; }}
        location = /v1/models {{ alias {files["models"]}; }}
        location = /v1/chat/completions {{
{chat}
        }}
    }}"""

    json_chat = f"            return 200 {_quote(canned.chat)};"
    lines = ["            default_type text/event-stream;", "            echo_read_request_body;"]
    for index, event in enumerate(canned.events):
        lines.append(f"            echo -n {_quote(event)};")
        lines.append("            echo_flush;")
        if index < len(canned.events) - 1:
            lines.append(f"            echo_sleep {CHUNK_GAP};")
    sse_chat = "\n".join(lines)
    return f"""\
load_module {ECHO_MODULE};
daemon off;
master_process on;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    geo $dollar {{ default "$"; }}
{common(json_port, json_chat)}
{common(sse_port, sse_chat)}
}}
"""


def _wrk_script(path: Path, stream: bool, headers: dict[str, str]) -> Path:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": STREAM_TOKENS if stream else TOKENS,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(json.dumps(body))}",
        'wrk.headers["Content-Type"] = "application/json"',
        *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_WRK_TOTAL = re.compile(r"(\d+) requests in ([0-9.]+)(\w+),")
_WRK_PCT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(\w+)", re.M)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str, cell: Cell) -> None:
    """Fill ``cell`` from wrk's summary (``--latency``)."""
    total = _WRK_TOTAL.search(text)
    if total is None:
        raise StartupError(f"wrk printed no summary: {text[-400:]}")
    cell.requests = int(total.group(1))
    seconds = float(total.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}.get(total.group(3), 1.0)
    cell.seconds = seconds
    cell.rps = cell.requests / seconds if seconds else 0.0
    for quantile, value, unit in _WRK_PCT.findall(text):
        millis = float(value) * _UNITS.get(unit, 1.0)
        if quantile == "50":
            cell.p50_ms = millis
        else:
            cell.p99_ms = millis
    non2xx = _WRK_NON2XX.search(text)
    socket = _WRK_SOCKET.search(text)
    cell.errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in socket.groups()) if socket else 0
    )


async def _wrk(url: str, script: Path, connections: int, duration: int) -> str:
    wrk = shutil.which("wrk")
    assert wrk is not None
    args = pinning.taskset(
        pinning.OTHER_CORE,
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            f"{url}/v1/chat/completions",
        ],
    )
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


class Running(Processes):
    """The processes of one system under test, and the one whose core is measured."""

    def __init__(self) -> None:
        super().__init__()
        self.measured: psutil.Process | None = None

    def add(self, proc: ManagedProcess, measured: bool = False) -> ManagedProcess:
        self.spawn(proc)
        if measured:
            self.measured = psutil.Process(proc.pid)
        return proc

    def cpu_seconds(self) -> float | None:
        if self.measured is None:
            return None
        try:
            procs = [self.measured, *self.measured.children(recursive=True)]
            return sum(p.cpu_times().user + p.cpu_times().system for p in procs)
        except psutil.Error:
            return None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=3.0)


async def _start_corral(
    ctx: BenchContext, upstream: str, running: Running, base: CorralBaseline | None = None
) -> tuple[str, dict[str, str]]:
    """``corral balancer`` with one agent; ``base``: another checkout's (corral-base)."""
    url, headers = await start_corral(
        ctx,
        running,
        "capacity-corral-base" if base is not None else "capacity-corral",
        "least_busy",
        [upstream],
        balancer_args=["--max-buffered-requests", str(SLOTS)],
        pinned=True,
        command=base.command() if base is not None else None,
        extra_env=base.extra_env() if base is not None else None,
    )
    running.measured = psutil.Process(running.procs[0].pid)  # the balancer: spawned first
    return url, headers


async def _start_corral_base(
    ctx: BenchContext, upstream: str, running: Running
) -> tuple[str, dict[str, str]]:
    return await _start_corral(ctx, upstream, running, CorralBaseline())


async def _start_nginx(
    ctx: BenchContext, upstream: str, running: Running
) -> tuple[str, dict[str, str]]:
    prefix = ctx.run_dir / "capacity-nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    text = proxy_config(prefix, [upstream], port)
    text = text.replace("keepalive 16;", "keepalive 1024;")
    text = text.replace("worker_connections 1024;", "worker_connections 8192;")
    conf.write_text(text, encoding="utf-8")
    proc = running.add(
        ManagedProcess(
            "capacity-nginx",
            pinning.taskset(pinning.PROXY_CORE, nginx_args(prefix, conf)),
            ctx.log_path("capacity-nginx"),
        ),
        measured=True,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(f"{url}/health", what="nginx proxy /health", proc=proc)
    return url, {}


async def _start_litellm(
    ctx: BenchContext, upstream: str, running: Running
) -> tuple[str, dict[str, str]]:
    ensure_installed()

    def spawn(proc: ManagedProcess) -> ManagedProcess:
        proc.args = pinning.taskset(pinning.PROXY_CORE, proc.args)
        return running.add(proc, measured=True)

    return await start_proxy(ctx, "capacity-litellm", MODEL, [upstream], spawn)


async def _measure(
    ctx: BenchContext,
    system: str,
    url: str,
    headers: dict[str, str],
    stream: bool,
    running: Running | None,
) -> list[Cell]:
    script = _wrk_script(
        ctx.run_dir / f"capacity-{system}-{'stream' if stream else 'json'}.lua", stream, headers
    )
    cells = []
    duration = _duration(ctx)
    for connections in STREAM_CONNECTIONS if stream else NON_STREAM_CONNECTIONS:
        await _wrk(url, script, connections, WARMUP)
        cell = Cell(system, stream, connections)
        before = running.cpu_seconds() if running is not None else None
        started = time.monotonic()
        text = await _wrk(url, script, connections, duration)
        wall = time.monotonic() - started
        after = running.cpu_seconds() if running is not None else None
        if before is not None and after is not None:
            cell.cpu_percent = 100.0 * (after - before) / wall
        parse_wrk(text, cell)
        log.info(
            "capacity %s %s c=%d: %.0f req/s, p50 %.2f ms, errors %d",
            system, "stream" if stream else "json", connections, cell.rps,
            cell.p50_ms or 0.0, cell.errors,
        )  # fmt: skip
        cells.append(cell)
    return cells


def _duration(ctx: BenchContext) -> int:
    return max(2, round(DURATION * min(1.0, ctx.scale)))


async def _start_passthrough(
    ctx: BenchContext, upstream: str, running: Running
) -> tuple[str, dict[str, str]]:
    import sys

    port = free_port()
    args = [sys.executable, "-m", "bench.systems.passthrough", upstream, str(port)]
    proc = running.add(
        ManagedProcess(
            "capacity-passthrough",
            pinning.taskset(pinning.PROXY_CORE, args),
            ctx.log_path("capacity-passthrough"),
        ),
        measured=True,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(f"{url}/health", what="pass-through /health", proc=proc)
    return url, {}


def unavailable() -> str | None:
    if shutil.which("wrk") is None:
        return "wrk is not installed (`apt-get install -y wrk`)"
    if nginx_binary() is None or not ECHO_MODULE.is_file():
        return (
            "nginx with the echo module is not installed (`apt-get install -y nginx "
            "libnginx-mod-http-echo`): it is the instant upstream"
        )
    return None


async def _run(ctx: BenchContext) -> tuple[Outcome, Canned]:
    outcome = Outcome()
    canned = await _capture(ctx)
    upstream_dir = ctx.run_dir / "capacity-upstream"
    upstream_dir.mkdir(parents=True, exist_ok=True)
    json_port, sse_port = free_port(), free_port()
    conf = upstream_dir / "nginx.conf"
    conf.write_text(_upstream_config(canned, upstream_dir, json_port, sse_port), encoding="utf-8")
    upstream = ManagedProcess(
        "capacity-upstream",
        pinning.taskset(pinning.OTHER_CORE, nginx_args(upstream_dir, conf)),
        ctx.log_path("capacity-upstream"),
    ).start()
    try:
        await wait_healthy(
            f"http://127.0.0.1:{json_port}/health", what="instant upstream", proc=upstream
        )
        starters = {
            "corral": _start_corral,
            "corral-base": _start_corral_base,
            "nginx": _start_nginx,
            "litellm": _start_litellm,
            "passthrough": _start_passthrough,
        }
        chosen = [
            s
            for s in SYSTEMS
            if (s in ctx.systems if ctx.systems else s != "corral-base") or s == "direct"
        ]
        for system in chosen:
            if system == "litellm" and installed_version() is None and not ctx.install_missing:
                outcome.missing[system] = f"{LITELLM_REQUIREMENT} is not installed"
                continue
            for stream in (False, True):
                backend = f"http://127.0.0.1:{sse_port if stream else json_port}"
                if system == "direct":
                    outcome.cells += await _measure(ctx, system, backend, {}, stream, None)
                    continue
                running = Running()
                try:
                    url, headers = await starters[system](ctx, backend, running)
                    outcome.cells += await _measure(ctx, system, url, headers, stream, running)
                except StartupError as exc:
                    outcome.missing[system] = str(exc)
                    log.warning("capacity: %s could not run: %s", system, exc)
                    break
                finally:
                    running.stop()
    finally:
        upstream.stop(grace=3.0)
    return outcome, canned


async def run(ctx: BenchContext) -> Section:
    reason = unavailable()
    if reason is not None:
        return Section(TITLE, f"*Not run: {reason}.*\n", missing={"all": reason})
    outcome, canned = await _run(ctx)
    return Section(TITLE, _report(ctx, outcome, canned), missing=outcome.missing)


def _fmt(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def _report(ctx: BenchContext, outcome: Outcome, canned: Canned) -> str:
    events = len(canned.events)
    systems = [s for s in SYSTEMS if any(c.system == s for c in outcome.cells)]

    def best(system: str, stream: bool) -> Cell | None:
        cells = [c for c in outcome.cells if c.system == system and c.stream == stream]
        return max(cells, key=lambda c: c.rps) if cells else None

    def per_core(system: str, stream: bool) -> float | None:
        """The best per-core-second figure over the system's cells of one kind."""
        found = [
            c.per_core(c.chunks_per_second(events) if stream else c.rps)
            for c in outcome.cells
            if c.system == system and c.stream == stream
        ]
        known = [f for f in found if f is not None]
        return max(known) if known else None

    def versus(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else DASH

    corral_rps, corral_chunks = per_core("corral", False), per_core("corral", True)
    rows = []
    for system in systems:
        j, s = best(system, False), best(system, True)
        rps_core, chunks_core = per_core(system, False), per_core(system, True)
        errors = sum(c.errors for c in outcome.cells if c.system == system)
        rows.append(
            [
                LABELS[system],
                _rate(j.rps if j else None),
                _rate(rps_core),
                versus(rps_core, corral_rps) if system != "corral" else DASH,
                _rate(s.chunks_per_second(events) if s else None),
                _rate(chunks_core),
                versus(chunks_core, corral_chunks) if system != "corral" else DASH,
                str(errors),
            ]
        )
    duration = _duration(ctx)
    parts = [
        "Small chat completions through one proxy process pinned to one core, from an "
        "upstream that answers at once (nginx serving the fake llama-server's captured "
        f"answers: {TOKENS} tokens non-streamed; {events} SSE events streamed, one chunk "
        f"each, {CHUNK_GAP * 1000:g} ms apart). `wrk` closed loop, one thread, "
        f"{duration} s per cell after {WARMUP} s of warm-up, at "
        f"{' and '.join(map(str, NON_STREAM_CONNECTIONS))} connections (non-streaming) and "
        f"{' and '.join(map(str, STREAM_CONNECTIONS))} (streaming). The system under test "
        "runs alone on core 0; the upstream, `wrk` and corral's agent share core 1. "
        "corral and the nginx proxy each write an access log line per request to a file "
        "(corral's default; nginx's `access_log`); the aiohttp pass-through logs nothing.",
        "",
        "### Headline: the most each system relayed",
        "",
        md_table(
            [
                "system",
                "requests/s",
                "per core-second",
                "vs corral",
                "chunks/s",
                "per core-second",
                "vs corral",
                "errors",
            ],
            rows,
        ),
        "",
        '"requests/s" and "chunks/s" are the best cell\'s measured rates. "per '
        "core-second\" divides a cell's rate by the share of its core the proxy used (its "
        "CPU time over the cell's wall time) and keeps the best cell: what one fully busy "
        "core relays. It is the fair figure where a proxy did not fill its core because "
        "the other core (upstream and `wrk`) ran out first, which is what limits the "
        'streaming cells and nginx here. "vs corral" compares the per-core figures. The '
        "first row has no proxy: `wrk` straight to the upstream, both on core 1, as a "
        "check of the set-up.",
        "",
        "### Targets",
        "",
        md_table(
            ["target", "measured (per core-second)", "met"],
            [
                [
                    f"corral relays ≥ {TARGET_RPS:,.0f} small requests/s on one core",
                    _rate(corral_rps),
                    "yes" if (corral_rps or 0) >= TARGET_RPS else "**no**",
                ],
                [
                    f"corral relays ≥ {TARGET_CHUNKS:,.0f} streamed chunks/s on one core",
                    _rate(corral_chunks),
                    "yes" if (corral_chunks or 0) >= TARGET_CHUNKS else "**no**",
                ],
            ],
        ),
        "",
    ]
    reference = per_core("passthrough", False)
    if reference and corral_rps:
        parts += [
            f"The aiohttp pass-through, thirty lines that do nothing but relay, manages "
            f"{reference:,.0f} requests per core-second: any proxy built on aiohttp (corral "
            f"is) starts from that ceiling; corral reaches "
            f"{100 * corral_rps / reference:.0f}% of it while it also authenticates, routes "
            "by model, leases a slot, counts metrics and writes an access log line per "
            "request.",
            "",
        ]
    cell_rows = []
    for cell in sorted(
        outcome.cells, key=lambda c: (SYSTEMS.index(c.system), c.stream, c.connections)
    ):
        rate = cell.chunks_per_second(events) if cell.stream else cell.rps
        cell_rows.append(
            [
                LABELS[cell.system],
                "stream" if cell.stream else "non-stream",
                str(cell.connections),
                _rate(cell.rps),
                _rate(cell.chunks_per_second(events)) if cell.stream else DASH,
                f"{cell.cpu_percent:.0f}%" if cell.cpu_percent is not None else DASH,
                _rate(cell.per_core(rate)),
                _fmt(cell.p50_ms),
                _fmt(cell.p99_ms),
                str(cell.errors),
            ]
        )
    parts += [
        "### Every cell",
        "",
        md_table(
            [
                "system",
                "kind",
                "connections",
                "requests/s",
                "chunks/s",
                "proxy CPU",
                "per core-second",
                "p50 ms",
                "p99 ms",
                "errors",
            ],
            cell_rows,
        ),
        "",
        '"proxy CPU" is the proxy process\'s CPU time (with its children) over the '
        'cell\'s wall time; 100% is its one core busy throughout. "per core-second" is '
        "the cell's requests/s (non-streaming) or chunks/s (streaming) over that share. "
        "Latencies are `wrk`'s, for whole responses; errors are `wrk`'s non-2xx "
        "responses and socket errors (timeouts at 10 s).",
        "",
    ]
    return "\n".join(parts)
