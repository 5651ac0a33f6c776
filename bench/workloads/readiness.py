"""Workload "readiness": from llama-server's own "model loaded" to a waiting client's first byte.

A client that asks before the model is loaded is held: corral buffers it until its
supervisor and agent report the instance ready; llama-server's router mode holds it
while it loads the model on demand. What a front door adds here is how late it notices
that its llama-server is ready. Each trial starts the system cold, sends one streamed
chat completion the moment its port accepts a connection, and compares:

- t0: when the llama-server logged ``srv llama_server: model loaded`` (printed right
  after it starts answering ``/health`` with 200; see tools/server/server.cpp), read
  from the log the system writes: corral's ``--log-dir`` file, the router's own output
  (it relays each child's log lines, prefixed with the child's port);
- t1: when the waiting client received the first byte of the response body.

Then, on the same warm system, the llama-server is SIGKILLed and a request sent at
once: corral restarts it by itself (after its 1 s backoff) while the request waits;
router mode restarts nothing until a request names the model, and answers errors until
it has noticed the exit, so the client retries every 20 ms. t0 is the restarted
server's ready line.

A relay can fall behind (corral's event loop at start-up), so t0 is the ready line's own
llama-server timestamp put on the harness's clock by the least-delayed line of the same
process; the time the line was read is reported beside it. A second measure needs no
relay at all: from the ready line to the line where llama-server starts the request,
both on llama-server's own log clock.

llama-swap is not available on this machine; it is listed as not measured.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import re
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from bench import plots
from bench.context import BenchContext
from bench.loadgen import RequestResult, RequestSpec, chat_request, parse_body
from bench.logtail import LogTail
from bench.procs import ManagedProcess, free_port
from bench.report import md_table
from bench.stats import DASH, percentile
from bench.systems.corral import serve_args, serve_env
from bench.systems.router import router_args
from bench.workloads import Section

log = logging.getLogger("bench.readiness")

NAME = "readiness"
TITLE = "Readiness: from llama-server ready to the first byte"
ORDER = 20

#: cold starts per system (each followed by one crash on the same process)
TRIALS = 20
MAX_TOKENS = 4
PROMPT = "Say hi"
#: requests straight to the warm llama-server after each cold start: its own TTFT
DIRECT_PROBES = 3
#: pause between connection attempts while the front door's port is not open yet
REFUSED_RETRY = 0.002
#: longest a waiting request may take (corral's buffer gives up after 10 s)
PROBE_LIMIT = 30.0
#: a client's pause before it sends a failed request again (after a crash)
RETRY_PAUSE = 0.02
#: how long after the first byte the ready line may still arrive in the log
LINE_GRACE = 2.0

READY_LINE = re.compile(r"srv +llama_server: model loaded")
#: the first line a llama-server process logs
START_LINE = re.compile(r"srv +llama_server: initializing")
#: llama-server starts working on a request (its slot takes the task)
LAUNCH_LINE = re.compile(r"slot launch_slot_: .*processing task")
PROMPT_EVAL = re.compile(r"prompt eval time =\s*([0-9.]+) ms")
#: llama-server's own log prefix: "[PORT] " when relayed by the router, then M.SS.mmm.uuu
STAMP = re.compile(r"^(\[\s*\d+\] )?(\d+)\.(\d+)\.(\d+)\.(\d+) ")
CORRAL_READY = re.compile(r"instance state name=\S+ state=ready")
CORRAL_DOWN = re.compile(r"instance down name=")
CORRAL_REPLACED = re.compile(r"upstream failed before first byte")

SYSTEMS = {"corral": "corral serve", "router": "llama-server router mode"}
KINDS = {
    "cold": "cold start",
    "crash": "after SIGKILL",
    "retry": "after SIGKILL, the client's retry",
}


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Probe:
    """One request sent to a front door, with the moments that matter (monotonic s)."""

    sent: float | None = None
    first_byte: float | None = None
    status: int | None = None
    error: str | None = None
    attempts: int = 0
    #: 503 answers before the front door took the request (router mode's first moments)
    early_503: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_byte is not None


@dataclass
class Trial:
    """One request that waited for a llama-server to become ready."""

    system: str
    kind: str
    index: int
    origin: float  # process start (cold) or the SIGKILL (crash, retry)
    probe: Probe
    ready: float | None = None  # t0: llama-server logged its ready line (see _placed)
    ready_read: float | None = None  # the harness read that line
    #: ready line -> llama-server starts the request, both on llama-server's own log clock
    server_gap: float = math.nan
    prompt_eval: float = math.nan  # llama-server's prompt eval time for that request
    noticed: float | None = None  # corral: its supervisor logged state=ready
    died: float | None = None  # corral, crash: its supervisor logged the exit
    replaced: bool = False  # corral, crash: first placed on the dead server, placed again
    failed: int = 0  # retry: failed attempts before the one measured
    direct: list[float] = field(default_factory=list)  # warm llama-server TTFTs

    @staticmethod
    def _since(start: float | None, end: float | None) -> float:
        return end - start if start is not None and end is not None else math.nan

    @property
    def gap(self) -> float:
        """t1 - t0: ready line to first byte (NaN if either is missing)."""
        return self._since(self.ready, self.probe.first_byte) if self.probe.ok else math.nan

    @property
    def gap_read(self) -> float:
        """t1 minus when the harness read the ready line (no correction for relay lag)."""
        return self._since(self.ready_read, self.probe.first_byte) if self.probe.ok else math.nan

    @property
    def relay_lag(self) -> float:
        """How long after llama-server logged the ready line the harness read it."""
        return self._since(self.ready, self.ready_read)

    @property
    def total(self) -> float:
        return self._since(self.origin, self.probe.first_byte) if self.probe.ok else math.nan

    @property
    def load(self) -> float:
        return self._since(self.origin, self.ready)

    @property
    def waited(self) -> bool:
        """The request went out before the ready line: it really was waiting."""
        sent, ready = self.probe.sent, self.ready
        return sent is not None and ready is not None and sent < ready

    def read_ready(self, tail: LogTail, after: float) -> None:
        """t0 from the first ready line read after ``after``, and the llama-server-clock
        gap to the request it then started."""
        lines = tail.lines()
        for at, (read_at, text) in enumerate(lines):
            if read_at > after and READY_LINE.search(text):
                self.ready_read = read_at
                self.ready = _placed(lines, at)
                self.server_gap, self.prompt_eval = _launch_after(lines[at:])
                return


def _stamp(match: re.Match[str]) -> float:
    minutes, secs, millis, micros = (int(match.group(i)) for i in range(2, 6))
    return minutes * 60 + secs + millis / 1e3 + micros / 1e6


def _same_process(lines: list[tuple[float, str]], at: int) -> list[tuple[float, float]]:
    """``(read_at, logged_at)`` of every stamped line of the llama-server process that
    wrote ``lines[at]``: same port prefix, between its "initializing" line and the next."""
    mine = STAMP.match(lines[at][1])
    assert mine is not None
    prefix = mine.group(1)

    def ours(text: str) -> re.Match[str] | None:
        match = STAMP.match(text)
        return match if match is not None and match.group(1) == prefix else None

    first = at
    while first > 0 and not (ours(lines[first][1]) and START_LINE.search(lines[first][1])):
        first -= 1
    out = []
    for index in range(first, len(lines)):
        read_at, text = lines[index]
        match = ours(text)
        if match is None:
            continue
        if index > at and START_LINE.search(text):
            break
        out.append((read_at, _stamp(match)))
    return out


def _placed(lines: list[tuple[float, str]], at: int) -> float:
    """When llama-server logged ``lines[at]``, on the harness's clock.

    A line can only reach the harness after it was logged, so the least-delayed line of
    the same process gives the offset between llama-server's log clock and ours:
    ``min(read_at - logged_at)``. This takes out a relay that falls behind (corral's
    event loop at start-up, say) and is at most the best line's delay, about a poll."""
    stamp = STAMP.match(lines[at][1])
    if stamp is None:
        return lines[at][0]
    offset = min(read_at - logged_at for read_at, logged_at in _same_process(lines, at))
    return offset + _stamp(stamp)


def _launch_after(lines: list[tuple[float, str]]) -> tuple[float, float]:
    """From the ready line (``lines[0]``) to the first task its server starts, both from
    llama-server's own log timestamps (same process: same port prefix); and that task's
    prompt eval time as llama-server reports it. Seconds; NaN where a line is missing."""
    ready = STAMP.match(lines[0][1])
    if ready is None:
        return math.nan, math.nan
    launched = math.nan
    for _, text in lines[1:]:
        stamp = STAMP.match(text)
        if stamp is None or stamp.group(1) != ready.group(1):
            continue
        if math.isnan(launched):
            if LAUNCH_LINE.search(text):
                launched = _stamp(stamp) - _stamp(ready)
        elif (prompt := PROMPT_EVAL.search(text)) is not None:
            return launched, float(prompt.group(1)) / 1000
    return launched, math.nan


def _spec(ctx: BenchContext) -> RequestSpec:
    return chat_request(ctx.model_name, stream=True, max_tokens=MAX_TOKENS, prompt=PROMPT)


async def probe(url: str, spec: RequestSpec, *, until_open: bool) -> Probe:
    """Send ``spec`` to ``url`` and read the whole response; stamp when it went out and
    its first body byte. ``until_open``: resend while the port refuses connections or
    answers 503 (router mode does for a few ms after its port opens)."""
    out = Probe()
    data = json.dumps(spec.body).encode()
    headers = {"Content-Type": "application/json"}
    deadline = time.monotonic() + PROBE_LIMIT
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=PROBE_LIMIT),
    ) as session:
        while True:
            out.attempts += 1
            chunks: list[bytes] = []
            again = False
            out.sent = time.monotonic()
            try:
                async with session.post(url + spec.path, data=data, headers=headers) as response:
                    if until_open and response.status == 503 and time.monotonic() < deadline:
                        await response.read()
                        out.early_503 += 1
                        again = True
                    else:
                        out.status = response.status
                        async for chunk in response.content.iter_any():
                            if out.first_byte is None:
                                out.first_byte = time.monotonic()
                            chunks.append(chunk)
            except aiohttp.ClientConnectorError as exc:
                if not (until_open and time.monotonic() < deadline):
                    out.error = type(exc).__name__
                    return out
                again = True
            except aiohttp.ClientError as exc:
                out.error = type(exc).__name__
                return out
            except TimeoutError:
                out.error = "timeout"
                return out
            if again:
                await asyncio.sleep(REFUSED_RETRY)
                continue
            result = RequestResult(sent=0.0, latency=0.0, status=out.status)
            parse_body(result, b"".join(chunks), spec.stream)
            out.error = result.error
            return out


async def direct_ttfts(url: str, spec: RequestSpec) -> list[float]:
    """Time to first byte of a few requests straight to a warm llama-server."""
    out = []
    for _ in range(DIRECT_PROBES):
        result = await probe(url, spec, until_open=False)
        if result.ok and result.sent is not None and result.first_byte is not None:
            out.append(result.first_byte - result.sent)
    return out


def llama_child(proc: ManagedProcess, binary: Path) -> tuple[psutil.Process, str] | None:
    """The single-model llama-server under ``proc`` and its URL (psutil, by command line)."""
    for child in proc.descendants():
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        if args and args[0] == str(binary) and "--port" in args and "--models-dir" not in args:
            return child, f"http://127.0.0.1:{args[args.index('--port') + 1]}"
    return None


async def _cold(
    ctx: BenchContext, system: str, index: int, proc: ManagedProcess, url: str, tail: LogTail
) -> Trial:
    """Start ``proc`` and send a request the moment its front door takes one."""
    started = time.monotonic()
    proc.start()
    trial = Trial(system, "cold", index, started, await probe(url, _spec(ctx), until_open=True))
    if trial.probe.ok:
        await tail.wait_for(READY_LINE, within=LINE_GRACE)
        found = llama_child(proc, ctx.llama_server)
        if found is not None:
            trial.direct = await direct_ttfts(found[1], _spec(ctx))
    else:
        log.error("%s trial %d: cold request failed: %s", system, index, trial.probe.error)
    return trial


async def _crash(
    ctx: BenchContext, system: str, index: int, proc: ManagedProcess, url: str, tail: LogTail
) -> list[Trial]:
    """SIGKILL the system's llama-server and send a request at once; if that one fails,
    send it again at once, as a client would, and measure that too."""
    found = llama_child(proc, ctx.llama_server)
    if found is None:
        log.error("%s trial %d: no llama-server child to kill", system, index)
        return []
    killed = time.monotonic()
    found[0].kill()
    trials = [Trial(system, "crash", index, killed, await probe(url, _spec(ctx), until_open=False))]
    if not trials[0].probe.ok:
        retry = Trial(system, "retry", index, killed, Probe())
        deadline = time.monotonic() + PROBE_LIMIT
        while not retry.probe.ok and time.monotonic() < deadline:
            if retry.probe.attempts:
                retry.failed += 1
            await asyncio.sleep(RETRY_PAUSE)
            retry.probe = await probe(url, _spec(ctx), until_open=False)
        trials.append(retry)
    if trials[-1].probe.ok:
        await tail.wait_for(READY_LINE, after=killed, within=LINE_GRACE)
    return trials


def _read_ready(trials: list[Trial], tail: LogTail) -> None:
    """Fill t0 of every trial whose request succeeded, once all lines are in."""
    for trial in trials:
        if trial.probe.ok:
            trial.read_ready(tail, trial.origin)


async def corral_trial(ctx: BenchContext, index: int) -> list[Trial]:
    """Cold start corral serve, then crash its llama-server."""
    inference, management = free_port(), free_port()
    log_dir = ctx.run_dir / "readiness" / f"corral-{index}"
    args = serve_args(ctx, inference, management, log_dir)
    env = serve_env(ctx, secrets.token_urlsafe(24))
    name = f"readiness-corral-{index}"
    proc = ManagedProcess(name, args, ctx.log_path(name), env=env)
    llama_tail = LogTail.first_in(log_dir).start()
    own_tail = LogTail.of(proc.log_path).start()
    url = f"http://127.0.0.1:{inference}"
    trials: list[Trial] = []
    try:
        trials.append(await _cold(ctx, "corral", index, proc, url, llama_tail))
        trials[0].noticed = own_tail.first(CORRAL_READY)
        if trials[0].probe.ok:
            for trial in await _crash(ctx, "corral", index, proc, url, llama_tail):
                trial.noticed = own_tail.first(CORRAL_READY, after=trial.origin)
                trial.died = own_tail.first(CORRAL_DOWN, after=trial.origin)
                trial.replaced = own_tail.first(CORRAL_REPLACED, after=trial.origin) is not None
                trials.append(trial)
    finally:
        proc.stop()
        llama_tail.stop()
        own_tail.stop()
    _read_ready(trials, llama_tail)
    return trials


async def router_trial(ctx: BenchContext, index: int) -> list[Trial]:
    """Cold start llama-server in router mode, then crash its child."""
    name = f"readiness-router-{index}"
    port = free_port()
    proc = ManagedProcess(name, router_args(ctx, port), ctx.log_path(name))
    tail = LogTail.of(proc.log_path).start()
    url = f"http://127.0.0.1:{port}"
    trials: list[Trial] = []
    try:
        trials.append(await _cold(ctx, "router", index, proc, url, tail))
        if trials[0].probe.ok:
            trials += await _crash(ctx, "router", index, proc, url, tail)
    finally:
        proc.stop()
        tail.stop()
    _read_ready(trials, tail)
    return trials


TRIAL_RUNNERS = {"corral": corral_trial, "router": router_trial}


def trial_count(ctx: BenchContext) -> int:
    return max(3, round(TRIALS * ctx.scale))


async def run(ctx: BenchContext) -> Section:
    systems = [s for s in SYSTEMS if s in ctx.systems]
    count = trial_count(ctx)
    trials: list[Trial] = []
    for index in range(count):
        # alternate which system goes first, so both see the machine's moods alike
        order = systems if index % 2 == 0 else list(reversed(systems))
        for system in order:
            done = await TRIAL_RUNNERS[system](ctx, index)
            for trial in done:
                log.info(
                    "%s %s %d: ready->first byte %s ms, start->first byte %s ms%s",
                    system,
                    trial.kind,
                    index,
                    _ms(trial.gap),
                    _ms(trial.total),
                    f", error {trial.probe.error}" if trial.probe.error else "",
                )
            trials += done
    missing = {
        "llama-swap": "not available on this machine (no binary and no network to fetch one)"
    }
    for system, label in SYSTEMS.items():
        if system not in systems:
            missing[label] = "not in --systems"
    markdown = render(ctx, count, systems, trials)
    images = plots.readiness_plot(ctx.docs_dir, trials) if trials else []
    return Section(TITLE, markdown, images, missing)


# -- report -----------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return DASH if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _pick(trials: list[Trial], system: str, kind: str) -> list[Trial]:
    return [t for t in trials if t.system == system and t.kind == kind]


def _values(trials: list[Trial], attr: str) -> list[float]:
    values = [getattr(t, attr) for t in trials]
    return [v for v in values if not math.isnan(v)]


def _p50(values: list[float]) -> float:
    return percentile(values, 50) if values else math.nan


def _p50_max(values: list[float]) -> str:
    if not values:
        return DASH
    return f"{_ms(percentile(values, 50))} / {_ms(max(values))}"


def _ratio(mine: list[float], corral: list[float]) -> str:
    a, b = _p50(mine), _p50(corral)
    if math.isnan(a) or math.isnan(b) or a <= 0 or b <= 0:
        return DASH
    return f"{a / b:.2f}x"


def _errors(trials: list[Trial]) -> str:
    kinds: collections.Counter[str] = collections.Counter()
    for trial in trials:
        if trial.probe.error:
            kinds[trial.probe.error] += 1
    return ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()) or "0"


def render(ctx: BenchContext, count: int, systems: list[str], trials: list[Trial]) -> str:
    parts = [
        f"How soon a front door notices that its llama-server has become ready. {count} "
        "trials per system, the systems alternating. A trial starts the system cold (no "
        "model loaded) and sends one streamed chat completion "
        f"(`max_tokens: {MAX_TOKENS}`, a {len(PROMPT.split())}-word prompt) the moment "
        "the front door accepts a connection, so the request is already waiting when the "
        "model finishes loading: corral buffers it, router mode holds it while it loads "
        "the model on demand. On the same process the llama-server is then SIGKILLed "
        "(found with psutil among the system's children) and a request sent at once; if "
        f"that request fails, the client sends it again every {RETRY_PAUSE * 1000:g} ms "
        'until one succeeds ("retry" rows: the one that succeeded). Then the system is '
        "stopped.",
        "",
        "- **t0**: when llama-server logged `srv llama_server: model loaded`. It prints "
        "that line right after it starts answering `/health` with 200 and before "
        "`listening on ...` (single-model mode, `tools/server/server.cpp`). The line is "
        "read from the log the system writes: corral writes its llama-server's output to "
        "`--log-dir` (one file per instance); the router relays each child's log lines to "
        "its own output, prefixed with the child's port. The harness follows each file "
        "from a thread that polls every millisecond and stamps each line when it reads it "
        "(`time.monotonic()`). A relay can fall behind (see below), so t0 is the line's "
        "own llama-server timestamp moved onto the harness's clock by the least-delayed "
        "line of the same process: t0 = logged + min over its lines of (read - logged). "
        'The column "from the line as read" uses the read time itself instead.',
        "- **t1**: when the waiting client received the first byte of the response body "
        "(the first SSE event), same clock.",
        "- **on llama-server's clock**: from the ready line to the line where llama-server "
        "starts the request (`slot launch_slot_: ... processing task`), both from "
        "llama-server's own log timestamps. It leaves out the relay of log lines and "
        "llama-server's own work on the request, so it is how long the front door took "
        "to hand over the waiting request.",
        "",
        "Only corral and router mode are measured: they start llama-server themselves and "
        "hold a request while it loads. The other systems of this report proxy to a "
        "llama-server that is already up.",
        "",
        "### Headline: from ready to the waiting client's first byte, p50 / max (ms)",
        "",
    ]
    headers = [
        "system",
        "start",
        "trials",
        "ready → first byte (t1 - t0)",
        "p50 vs corral's",
        "ready → request starts, on llama-server's clock",
        "p50 vs corral's",
        "start → first byte",
        "errors",
    ]
    rows = []
    for kind, kind_label, system, picked in _groups(systems, trials):
        corral = _pick(trials, "corral", "crash" if kind == "retry" else kind)
        gaps, server = _values(picked, "gap"), _values(picked, "server_gap")
        rows.append(
            [
                SYSTEMS[system],
                kind_label,
                str(len(picked)),
                _p50_max(gaps),
                DASH if system == "corral" else _ratio(gaps, _values(corral, "gap")),
                _p50_max(server),
                DASH if system == "corral" else _ratio(server, _values(corral, "server_gap")),
                _p50_max(_values(picked, "total")),
                _errors(picked),
            ]
        )
    parts += [md_table(headers, rows, right_from=2), ""]
    detail_rows = [
        [
            SYSTEMS[system],
            kind_label,
            _p50_max(_values(picked, "load")),
            _p50_max(_values(picked, "server_gap")),
            _p50_max(_values(picked, "prompt_eval")),
            _p50_max(_values(picked, "gap")),
            _p50_max(_values(picked, "gap_read")),
            _p50_max(_values(picked, "relay_lag")),
        ]
        for kind, kind_label, system, picked in _groups(systems, trials)
    ]
    ok = [t for t in trials if t.probe.ok]
    late = [t for t in ok if not t.waited]
    waited = (
        "In every trial the request was sent before t0."
        if not late
        else f"In {len(late)} of {len(ok)} trials the request was sent after t0 (it did not wait)."
    )
    parts += [
        '"start" is the process start for a cold start and the SIGKILL for a crash. '
        "\"p50 vs corral's\" is the system's p50 over corral's (a retry is compared with "
        f"corral's after-SIGKILL row). {waited}",
        "",
        "### The parts, p50 / max (ms)",
        "",
        md_table(
            [
                "system",
                "start",
                "start → ready",
                "ready → request starts (llama-server's clock)",
                "its prompt eval (llama-server)",
                "ready → first byte",
                "from the line as read",
                "line read late by",
            ],
            detail_rows,
            right_from=2,
        ),
        "",
        '"its prompt eval" is llama-server\'s own `prompt eval time` for the waiting '
        "request: after a restart it is sometimes far longer than the ~1-5 ms of a warm "
        "request, which shows in t1 - t0 but is llama-server's work. \"from the line as "
        'read" is t1 minus the moment the harness read the ready line, and "line read late '
        "by\" the difference: the path is llama-server's logging thread, the system's relay "
        "(corral's event loop, the router's monitor thread) and the harness's 1 ms poll. "
        "When corral starts, its event loop shares the two cores with llama-server's "
        "loading threads and with its own start-up work, and its relay of llama-server's "
        "output falls behind: read as is, the line would flatter corral's cold start.",
        "",
    ]
    for system in systems:
        cold = _pick(trials, system, "cold")
        early = [t for t in cold if t.probe.early_503]
        if not early:
            continue
        why = (
            "its HTTP server accepts connections a moment before it marks itself ready"
            if system == "router"
            else "before it took the request"
        )
        parts += [
            f"In {len(early)} of {len(cold)} cold starts {SYSTEMS[system]} answered the "
            f"first request with 503: {why}. The client sent the request again (as it "
            "does while the port refuses connections) and the trial measures the request "
            "that was taken.",
            "",
        ]
    words = _in_words(trials)
    if words:
        parts += ["In words:", "", *words, ""]
    corral_rows = _corral_breakdown(trials)
    if corral_rows:
        parts += [
            "### Where corral's time goes, p50 / max (ms)",
            "",
            md_table(
                ["start", "ready line → corral logs ready", "corral logs ready → first byte"],
                corral_rows,
            ),
            "",
            "`corral logs ready` is when corral's own log line `instance state name=... "
            "state=ready` was read (corral logs from its event loop, straight to its output, "
            "so this is not relayed): its supervisor's `/health` poll has answered 200. The "
            "supervisor polls every 50 ms from the moment it starts llama-server, so with a "
            "load as short and steady as this model's the first poll after ready comes at "
            "about the same point of the interval in every trial rather than half an "
            "interval late on average. Before a buffered request can be placed, the agent "
            "then reads `/health`, `/props` and `/slots` again and reports the instance to "
            "the balancer (in the same process, over the agent protocol).",
            "",
        ]
    parts += ["### Reference: the warm llama-server's own time to first byte (ms)", ""]
    ref_rows = []
    for system in systems:
        direct = [v for t in _pick(trials, system, "cold") for v in t.direct]
        ref_rows.append([SYSTEMS[system], str(len(direct)), _p50_max(direct)])
    parts += [
        md_table(["llama-server behind", "requests", "p50 / max"], ref_rows),
        "",
        f"{DIRECT_PROBES} requests straight to the llama-server after each cold start: "
        "the part of t1 - t0 that is llama-server's own work on a warm request (the first "
        "request after a load can take longer).",
        "",
        "### Every trial: ready line → first byte (ms)",
        "",
    ]
    per_rows = []
    for kind, kind_label in KINDS.items():
        for system in systems:
            picked = _pick(trials, system, kind)
            if picked:
                per_rows.append(
                    [SYSTEMS[system], kind_label, " · ".join(_ms(t.gap) for t in picked)]
                )
    parts += [md_table(["system", "start", "trials in order"], per_rows, right_from=3), ""]
    corral_setup = shlex.join(["corral", "serve", "--log-dir", "DIR", "...", "--", *ctx.llama_args])
    parts += [
        f"Set-ups: `{corral_setup}`, otherwise as in the overhead workload; router mode as "
        f"there (`--models-max 1`, {ctx.model.name} alone in its models folder) but with no "
        "warm-up request. Logs of every trial are kept in `bench/out/run/logs/readiness-*` "
        "and `bench/out/run/readiness/`.",
        "",
    ]
    return "\n".join(parts)


def _groups(systems: list[str], trials: list[Trial]) -> list[tuple[str, str, str, list[Trial]]]:
    """(kind, its label, system, its trials) for every kind and system that has trials."""
    return [
        (kind, label, system, picked)
        for kind, label in KINDS.items()
        for system in systems
        if (picked := _pick(trials, system, kind))
    ]


def _in_words(trials: list[Trial]) -> list[str]:
    lines = []
    corral_cold, router_cold = _pick(trials, "corral", "cold"), _pick(trials, "router", "cold")
    if corral_cold and router_cold:
        c, r = _p50(_values(corral_cold, "gap")), _p50(_values(router_cold, "gap"))
        cs, rs = _p50(_values(corral_cold, "server_gap")), _p50(_values(router_cold, "server_gap"))
        times = f"; corral's is {c / r:.0f}x as long" if c > 0 and r > 0 else ""
        lines.append(
            f"- Cold start: the waiting client's first byte comes {_ms(c)} ms after the "
            f"ready line through corral and {_ms(r)} ms through router mode (p50{times}); "
            f"on llama-server's own clock corral hands the request over {_ms(cs)} ms after "
            f"ready, router mode {_ms(rs)} ms."
        )
    crash = _pick(trials, "corral", "crash")
    if crash:
        died = [t.died - t.origin for t in crash if t.died is not None]
        replaced = sum(t.replaced for t in crash)
        text = "- After SIGKILL, corral "
        if died:
            text += f"logs the exit {_ms(_p50(died))} ms after the kill (p50) and "
        text += (
            "starts llama-server again after its restart backoff (1 s after a first "
            f"crash); the restarted server's ready line comes {_p50_max(_values(crash, 'load'))}"
            " ms (p50 / max) after the kill and the waiting request's first byte "
            f"{_p50_max(_values(crash, 'total'))} ms after it, with "
            f"{_errors(crash)} errors."
        )
        if replaced:
            text += (
                f" In {replaced} of {len(crash)} crashes the request reached corral before "
                "it had noticed the exit: it was placed on the dead server, refused, and "
                "placed again (corral's log: `upstream failed before first byte`)."
            )
        lines.append(text)
    router_crash = _pick(trials, "router", "crash")
    if router_crash:
        failed = [t for t in router_crash if not t.probe.ok]
        text = "- Router mode restarts no crashed child by itself."
        if failed:
            text += (
                f" The request sent right after the kill failed in {len(failed)} of "
                f"{len(router_crash)} trials ({_errors(failed)}): until the router notices "
                "the exit it proxies to the dead child (HTTP 500)"
            )
            if any(t.probe.error == "http_400" for t in failed):
                text += ", and for a moment after, it answers 400 (`model name=... is not running`)"
            text += "."
        retries = _pick(trials, "router", "retry")
        if retries:
            ok = [t for t in retries if t.probe.ok]
            failures = sorted(t.failed for t in retries)
            text += (
                f" Retrying every {RETRY_PAUSE * 1000:g} ms, the client got through in "
                f"{len(ok)} of {len(retries)} trials after {failures[0]} to {failures[-1]} "
                "more failures: once the router has seen the exit, the request makes it load "
                "the model again, like a cold load on demand; first byte "
                f"{_p50_max(_values(retries, 'total'))} ms (p50 / max) after the kill."
            )
        lines.append(text)
    return lines


def _corral_breakdown(trials: list[Trial]) -> list[list[str]]:
    rows = []
    for kind, kind_label in KINDS.items():
        picked = [t for t in _pick(trials, "corral", kind) if t.probe.ok]
        if not picked:
            continue
        noticed = [
            t.noticed - t.ready for t in picked if t.noticed is not None and t.ready is not None
        ]
        served = [
            t.probe.first_byte - t.noticed
            for t in picked
            if t.noticed is not None and t.probe.first_byte is not None
        ]
        rows.append([kind_label, _p50_max(noticed), _p50_max(served)])
    return rows
