"""Workload "hetero": a heterogeneous fleet under Poisson load, by front door and policy.

The question: when the servers behind one model differ in how many requests they take
at once, does placing by free slots keep the time to first token down where turn-taking
(round robin, random shuffle) sends the small server more than it can take?

Set-up, fresh for every system (new llama-server processes, so none inherits another's
queues or caches):

- three real llama-servers on one model with different slot counts: ``--parallel 1``,
  ``2`` and ``4`` (7 slots), each ``--threads 1 -c 4096 --metrics``;
- the model is the bench's tiny llama made bigger (``n_embd 512``, 8 layers, 137 MB)
  so a request takes a few hundred ms: ``max_tokens`` 24, streamed, a prompt of about
  70 tokens with the chat template; a 4-slot server decodes its slots in one batch, so
  alone on a core it completes more requests per second than the 1-slot one (7.7
  against 4.8 measured), though each takes longer;
- **capacity** is measured first, on a fleet of its own: every slot kept busy by
  closed-loop clients straight to the servers (one per slot), requests completed per
  second after a second of warm-up. The servers share the machine's two cores, so this
  is what the fleet completes with every slot *and* both cores busy;
- then, per system, after a warm-up through its front door, Poisson arrivals
  (``LoadGenerator.open_loop``, the same seeded schedule and prompts for every system)
  at 50%, 80% and 95% of that capacity for 5, 13 and 6 s (:data:`LOADS`: the target's
  load runs longest), one after the other on the same servers; every request of one
  load ends before the next load starts.

Systems: ``corral balancer`` with three ``corral agent``s under ``least_busy`` (the
default: most free slots first) and ``round_robin`` (turn-taking among instances with
a free slot, buffering when none has one); nginx round robin over the three servers
(blind to slots: each server gets a third of the requests and llama-server queues what
its slots can't take; ``max_fails=0``, see :mod:`bench.systems.nginx`); the LiteLLM
proxy with the three servers as one model group, ``simple-shuffle`` (random, no weights
set) and ``least-busy`` (fewest requests in flight through the proxy, blind to slot
counts).

Measured: TTFT and latency p50/p99 (client side: TTFT includes any wait in a front
door's buffer or a server's queue), errors, how many requests each server answered (its
``llamacpp:tokens_predicted_total`` / ``max_tokens``), and the CPU the front door's
processes used (a share of one core; on two shared cores it is taken from the servers).

Why the servers share the cores, and what that does to the result, is in the section
text (:func:`_intro`): in short, with every server computing on the same two cores the
CPU, not a slot, is what the fleet runs out of, so placement matters much less than on
hosts with their own accelerators.

Takes about 3.5 minutes on this 2-core machine (210 s measured: capacity 8 s, then 35
to 50 s a system, LiteLLM's two start-ups included); ``--quick`` cuts every load to 2 s
and the capacity measurement to 4 s (about 1.5 minutes, most of it start-ups and
warm-ups).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import plots
from bench.context import BenchContext, StartupError
from bench.fleet import (
    Processes,
    model_words,
    server_counters,
    start_corral,
    start_llama_servers,
    tiny_model,
)
from bench.loadgen import LoadGenerator, RequestSpec, RunResult, chat_request
from bench.report import md_table
from bench.stats import DASH, Summary, ms
from bench.systems import litellm, nginx
from bench.workloads import Section

log = logging.getLogger("bench.hetero")

NAME = "hetero"
TITLE = "Heterogeneous fleet: Poisson load over servers with 1, 2 and 4 slots"
ORDER = 35

PARALLELS = (1, 2, 4)
CONTEXT = 4096
MODEL_NAME = "hetero"
MODEL_SHAPE = {"n_embd": 512, "n_layer": 8, "n_head": 8}
MAX_TOKENS = 24
PROMPT_WORDS = 8
#: load (share of the measured capacity) -> seconds of arrivals; the target's load runs
#: longest, for a steadier p99
LOADS = {0.5: 5.0, 0.8: 13.0, 0.95: 6.0}
TARGET_LOAD = 0.8
CAPACITY_WARMUP = 1.0
CAPACITY_DURATION = 6.0
MINIMUM_DURATION = 2.0
CAPACITY_MINIMUM = 4.0
REQUEST_LIMIT = 120.0


@dataclass(frozen=True)
class Door:
    """One system under test: a front door and, for corral and LiteLLM, its policy."""

    key: str
    family: str  # the --systems word that selects it
    label: str
    policy: str = ""


DOORS = (
    Door("least_busy", "corral", "corral `least_busy`", "least_busy"),
    Door("round_robin", "corral", "corral `round_robin`", "round_robin"),
    Door("nginx", "nginx", "nginx round robin"),
    Door("litellm-shuffle", "litellm", "LiteLLM `simple-shuffle`", "simple-shuffle"),
    Door("litellm-least-busy", "litellm", "LiteLLM `least-busy`", "least-busy"),
)
BASELINE = "least_busy"


@dataclass
class Capacity:
    total: float  # requests per second, the fleet
    per_server: list[float]


@dataclass
class Level:
    """One system at one load."""

    load: float
    rate: float  # offered, requests per second
    run: RunResult
    answered: list[float]  # requests each server answered
    door_cpu: float  # CPU seconds the front door's processes used meanwhile

    @property
    def summary(self) -> Summary:
        return Summary.of(self.run.results)

    @property
    def door_share(self) -> float:
        """The front door's CPU use as a share of one core over the load's wall time."""
        return self.door_cpu / self.run.wall if self.run.wall else 0.0


@dataclass
class Outcome:
    door: Door
    levels: dict[float, Level] = field(default_factory=dict)


def _duration(ctx: BenchContext, seconds: float) -> float:
    return max(MINIMUM_DURATION, seconds * ctx.scale)


def _count(ctx: BenchContext, capacity: float, load: float) -> int:
    """Requests sent at ``load``: its arrival rate times its duration."""
    return max(1, round(capacity * load * _duration(ctx, LOADS[load])))


def _prompts(words: list[str], tag: str, count: int) -> list[str]:
    """``count`` prompts of :data:`PROMPT_WORDS` words (seeded by ``tag``: a load gets
    the same prompts for every system)."""
    rng = random.Random(f"hetero-{tag}")
    return [
        f"Request {index} {tag}: " + " ".join(rng.choice(words) for _ in range(PROMPT_WORDS))
        for index in range(count)
    ]


async def _closed_until(
    url: str, clients: int, prompts: Iterator[str], until: float
) -> list[float]:
    """``clients`` closed-loop clients on ``url`` until ``until`` (perf_counter), each
    request with the next of ``prompts``; the completion time of every successful one."""
    done: list[float] = []
    async with LoadGenerator(url, timeout=REQUEST_LIMIT) as gen:

        async def client() -> None:
            while time.perf_counter() < until:
                spec = chat_request(
                    MODEL_NAME, stream=True, max_tokens=MAX_TOKENS, prompt=next(prompts)
                )
                if (await gen.send(spec)).ok:
                    done.append(time.perf_counter())

        await asyncio.gather(*(client() for _ in range(clients)))
    return done


async def _warm_up(backends: list[str], words: list[str]) -> None:
    """One request per slot, straight to each server, all at once."""
    prompts = iter(_prompts(words, "warm-up", sum(PARALLELS)))

    async def one(url: str, prompt: str) -> None:
        async with LoadGenerator(url, timeout=REQUEST_LIMIT) as gen:
            await gen.send(
                chat_request(MODEL_NAME, stream=True, max_tokens=MAX_TOKENS, prompt=prompt)
            )

    await asyncio.gather(
        *(
            one(b, next(prompts))
            for b, slots in zip(backends, PARALLELS, strict=True)
            for _ in range(slots)
        )
    )


async def _warm_up_door(url: str, headers: dict[str, str], words: list[str]) -> None:
    """Two requests per slot through a front door just started, a slot's worth at a
    time, then a second's rest: the first requests through a proxy pay for its lazy
    set-up (LiteLLM's are several times slower), which is not what the loads measure."""
    slots = sum(PARALLELS)
    prompts = _prompts(words, "warm-up", 2 * slots)

    def make(index: int) -> RequestSpec:
        return chat_request(MODEL_NAME, stream=True, max_tokens=MAX_TOKENS, prompt=prompts[index])

    async with LoadGenerator(url, headers=headers, timeout=REQUEST_LIMIT) as gen:
        await gen.closed_loop(make, concurrency=slots, count=len(prompts))
    await asyncio.sleep(1.0)


async def _capacity(ctx: BenchContext, model: Path, words: list[str]) -> Capacity:
    """Requests per second the fleet completes with every slot busy (clients straight
    to the servers), on a fleet of its own."""
    processes = Processes()
    duration = max(CAPACITY_MINIMUM, CAPACITY_DURATION * ctx.scale)
    prompts = iter(_prompts(words, "capacity", 100_000))
    try:
        backends = await start_llama_servers(
            ctx, processes, model, MODEL_NAME, "hetero-capacity", PARALLELS, CONTEXT
        )
        await _warm_up(backends, words)
        start = time.perf_counter() + CAPACITY_WARMUP
        until = start + duration
        done = await asyncio.gather(
            *(_closed_until(b, p, prompts, until) for b, p in zip(backends, PARALLELS, strict=True))
        )
    finally:
        processes.stop()
    per_server = [sum(1 for t in d if start <= t <= until) / duration for d in done]
    return Capacity(sum(per_server), per_server)


async def _front_door(
    ctx: BenchContext, processes: Processes, door: Door, backends: list[str]
) -> tuple[str, dict[str, str]]:
    name = f"hetero-{door.key}"
    if door.family == "corral":
        return await start_corral(ctx, processes, name, door.policy, backends)
    if door.family == "nginx":
        return await nginx.start_proxy(ctx, name, backends, processes.spawn), {}
    litellm.ensure_installed()
    return await litellm.start_proxy(
        ctx, name, MODEL_NAME, backends, processes.spawn, routing_strategy=door.policy
    )


async def _answered(backends: list[str]) -> list[float]:
    counters = [await server_counters(b) for b in backends]
    return [c.get("tokens_predicted_total", 0.0) / MAX_TOKENS for c in counters]


async def _measure(
    ctx: BenchContext, door: Door, model: Path, capacity: float, words: list[str]
) -> Outcome:
    processes = Processes()
    outcome = Outcome(door)
    try:
        backends = await start_llama_servers(
            ctx, processes, model, MODEL_NAME, f"hetero-{door.key}", PARALLELS, CONTEXT
        )
        url, headers = await _front_door(ctx, processes, door, backends)
        door_procs = processes.procs[len(PARALLELS) :]
        await _warm_up_door(url, headers, words)
        for load in LOADS:
            rate = capacity * load
            count = _count(ctx, capacity, load)
            prompts = _prompts(words, f"at {load:.0%}", count)

            def make(index: int, prompts: list[str] = prompts) -> RequestSpec:
                return chat_request(
                    MODEL_NAME, stream=True, max_tokens=MAX_TOKENS, prompt=prompts[index]
                )

            before = await _answered(backends)
            cpu_before = sum(p.cpu_seconds() for p in door_procs)
            async with LoadGenerator(url, headers=headers, timeout=REQUEST_LIMIT) as gen:
                run = await gen.open_loop(make, rate=rate, count=count, seed=round(load * 100))
            cpu = sum(p.cpu_seconds() for p in door_procs) - cpu_before
            after = await _answered(backends)
            answered = [a - b for a, b in zip(after, before, strict=True)]
            outcome.levels[load] = Level(load, rate, run, answered, cpu)
            s = outcome.levels[load].summary
            log.info(
                "hetero: %s at %.0f%% (%.2f req/s): TTFT p50 %s p99 %s ms, %d errors, "
                "per server %s",
                door.key,
                load * 100,
                rate,
                ms(s.ttft_p50, 0),
                ms(s.ttft_p99, 0),
                s.errors,
                answered,
            )
            await asyncio.sleep(0.5)
    finally:
        processes.stop()
    return outcome


def _times(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def _level_table(load: float, outcomes: list[Outcome]) -> str:
    rows = []
    for outcome in outcomes:
        level = outcome.levels.get(load)
        if level is None:
            continue
        s = level.summary
        rows.append(
            [
                outcome.door.label,
                f"{level.rate:.2f}",
                str(s.count),
                str(s.errors),
                ms(s.ttft_p50, 0),
                ms(s.ttft_p99, 0),
                ms(s.p50, 0),
                ms(s.p99, 0),
                " / ".join(f"{a:.0f}" for a in level.answered),
                f"{level.door_share:.0%}",
            ]
        )
    return md_table(
        [
            "system",
            "offered req/s",
            "requests",
            "errors",
            "TTFT p50",
            "TTFT p99",
            "p50",
            "p99",
            "requests per server (1 / 2 / 4 slots)",
            "front door CPU",
        ],
        rows,
    )


def _p99_ratios(outcomes: list[Outcome]) -> str:
    """Each system's TTFT p99 against corral ``least_busy``'s, per load."""
    base = next((o for o in outcomes if o.door.key == BASELINE), None)
    if base is None:
        return ""
    rows = []
    for outcome in outcomes:
        if outcome is base:
            continue
        cells = [outcome.door.label]
        for load in LOADS:
            mine, theirs = outcome.levels.get(load), base.levels.get(load)
            if mine is None or theirs is None:
                cells.append(DASH)
                continue
            a, b = mine.summary.ttft_p99, theirs.summary.ttft_p99
            cells.append(_times(a / b) if a == a and b == b and b > 0 else DASH)
        rows.append(cells)
    return md_table(["system", *(f"{load:.0%} load" for load in LOADS)], rows)


def _targets(outcomes: list[Outcome]) -> str:
    by_key = {o.door.key: o for o in outcomes}
    base = by_key.get(BASELINE)
    if base is None or TARGET_LOAD not in base.levels:
        return ""
    ours = base.levels[TARGET_LOAD].summary.ttft_p99
    lines = []
    for key, what in (
        ("nginx", "nginx round robin (blind to slots)"),
        ("round_robin", "corral `round_robin` (takes turns among servers with a free slot)"),
    ):
        other = by_key.get(key)
        if other is None or TARGET_LOAD not in other.levels:
            continue
        theirs = other.levels[TARGET_LOAD].summary.ttft_p99
        value = theirs / ours if ours > 0 else float("nan")
        compared = f"{_times(value)} lower" if value >= 1 else f"{_times(1 / value)} higher"
        lines.append(
            [
                f"TTFT p99 ≥ 2x lower than {what}",
                f"{compared} ({ms(ours, 0)} against {ms(theirs, 0)} ms)",
                "yes" if value >= 2 else "**no**",
            ]
        )
    errors = base.levels[TARGET_LOAD].summary.errors
    lines.append(["(no target) errors under corral `least_busy`", str(errors), "n/a"])
    table = md_table(["target", "measured", "met"], lines)
    missed = any(line[2] == "**no**" for line in lines)
    why = (
        "\n\nWhere a target is missed, the paragraph on slots and cores above is why: on "
        "two shared cores the CPU, not a slot, is what every placement runs out of."
        if missed
        else ""
    )
    return f"Targets, corral `least_busy` at {TARGET_LOAD:.0%} load:\n\n{table}{why}"


def _plot(ctx: BenchContext, outcomes: list[Outcome]) -> list[Path]:
    panels = []
    for stat, title in (("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99")):
        series = {
            o.door.label.replace("`", ""): [
                (load * 100, getattr(o.levels[load].summary, stat) * 1000)
                for load in LOADS
                if load in o.levels
            ]
            for o in outcomes
        }
        panels.append((f"{title} (ms, log scale)", series))
    path = ctx.docs_dir / "bench-hetero-ttft.png"
    return plots.load_lines(
        path,
        "Heterogeneous fleet (1, 2 and 4 slots): time to first token against load",
        "offered load, % of the fleet's measured capacity",
        panels,
    )


def _notes(outcomes: list[Outcome]) -> list[str]:
    notes = []
    for outcome in outcomes:
        kinds: Counter[str] = Counter()
        late = 0.0
        for level in outcome.levels.values():
            kinds.update(level.run.errors())
            late = max([late, *(r.lateness for r in level.run.results)])
        if kinds:
            listed = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
            notes.append(f"{outcome.door.label}: errors by kind: {listed}.")
        if late > 0.05:
            notes.append(
                f"{outcome.door.label}: the load generator sent a request up to "
                f"{late * 1000:.0f} ms after its scheduled time (it shares the cores)."
            )
    return notes


def _intro(ctx: BenchContext, capacity: Capacity) -> str:
    slots = sum(PARALLELS)
    counts = [_count(ctx, capacity.total, load) for load in LOADS]
    per_server = " / ".join(f"{c:.2f}" for c in capacity.per_server)
    third = capacity.total * TARGET_LOAD / len(PARALLELS)
    smallest = capacity.per_server[0]
    per_slot = [c / p for c, p in zip(capacity.per_server, PARALLELS, strict=True)]
    loads = ", ".join(
        f"{load:.0%} ({_duration(ctx, seconds):.0f} s)" for load, seconds in LOADS.items()
    )
    return (
        f"Three llama-servers on one model with `--parallel` {', '.join(map(str, PARALLELS))} "
        f"({slots} slots), each `--threads 1 -c {CONTEXT}`; a tiny llama made bigger "
        f"(n_embd {MODEL_SHAPE['n_embd']}, {MODEL_SHAPE['n_layer']} layers) so a request "
        f"takes a few hundred ms; streamed chat completions, `max_tokens` {MAX_TOKENS}, "
        f"{PROMPT_WORDS}-word prompts (about 70 tokens with the template). Fresh servers "
        "for every system, warmed up through its front door. **Capacity**, measured first "
        "with every slot kept busy by clients straight to the servers: "
        f"**{capacity.total:.2f} requests/s** (1-slot / 2-slot / 4-slot server: "
        f"{per_server}). Poisson arrivals at {loads} of it, the same schedule and prompts "
        "for every system. Times in ms, measured by the client: TTFT includes any wait in "
        f"a front door's buffer or in a server's own queue. With {min(counts)} to "
        f"{max(counts)} requests a load, p99 is close to the slowest request: the tables "
        "are one run, not a distribution of runs. Front door CPU: what its processes "
        "(corral's balancer and three agents, nginx, LiteLLM) used, as a share of one "
        "core. LiteLLM: "
        f"{litellm.LITELLM_REQUIREMENT}, the three servers as one model group.\n\n"
        "**Capacity here is slots *and* cores.** The three servers run one thread each on "
        "this machine's two cores, beside the front door and the load generator: with "
        "every slot busy they compete for the cores, and the capacity above is what they "
        "complete that way. A server alone gets a whole core and runs faster: the 1-slot "
        f"server completes {smallest:.2f} requests/s while the others are busy, and more "
        f"when they are not. Round robin sends it a third of the requests, {third:.2f}/s "
        f"at {TARGET_LOAD:.0%} load; where that is near or above what it completes, "
        "requests queue behind its one slot while slots elsewhere are free, which is what "
        "a slot-aware front door avoids. But whatever the placement, every request is "
        "computed on the same two cores, so a queue on one server frees CPU for the "
        "others, and the CPU is the bottleneck for all systems alike. Nor is a slot a "
        "unit of speed: with every slot busy the 1-slot server completed "
        f"{per_slot[0]:.2f} requests/s per slot, the {PARALLELS[-1]}-slot one "
        f"{per_slot[-1]:.2f} (it decodes its sequences in one batch on one thread), and "
        "`least_busy` (most free slots first) sends the biggest server the most requests, "
        "which then take longer there. On hosts with "
        "their own accelerators a slot's cost does not fall on the other servers, and "
        "placement decides more than it does here."
    )


async def run(ctx: BenchContext) -> Section:
    started = time.monotonic()
    model = tiny_model(ctx, MODEL_NAME, seed=11, **MODEL_SHAPE)
    words = model_words(model)
    doors = [d for d in DOORS if not ctx.systems or d.family in ctx.systems]
    missing: dict[str, str] = {}
    if any(d.family == "nginx" for d in doors) and (why := nginx.Nginx().unavailable(ctx)):
        missing["nginx round robin"] = why
        doors = [d for d in doors if d.family != "nginx"]
    if any(d.family == "litellm" for d in doors) and (why := litellm.LiteLLM().unavailable(ctx)):
        missing["LiteLLM"] = why
        doors = [d for d in doors if d.family != "litellm"]

    capacity = await _capacity(ctx, model, words)
    log.info(
        "hetero: capacity %.2f req/s (per server %s)",
        capacity.total,
        [round(c, 2) for c in capacity.per_server],
    )
    if capacity.total <= 0:
        raise StartupError("the fleet completed no request while its capacity was measured")
    outcomes: list[Outcome] = []
    for door in doors:
        log.info("hetero: measuring %s", door.key)
        try:
            outcomes.append(await _measure(ctx, door, model, capacity.total, words))
        except StartupError as exc:
            missing[door.label] = str(exc)

    parts = [_intro(ctx, capacity)]
    for load in LOADS:
        parts.append(f"**{load:.0%} load**\n\n" + _level_table(load, outcomes))
    ratios = _p99_ratios(outcomes)
    if ratios:
        parts.append("TTFT p99 against corral `least_busy` (times higher):\n\n" + ratios)
    targets = _targets(outcomes)
    if targets:
        parts.append(targets)
    parts += _notes(outcomes)
    log.info("hetero: done in %.0f s", time.monotonic() - started)
    images = _plot(ctx, outcomes) if outcomes else []
    return Section(TITLE, "\n\n".join(parts), images=images, missing=missing)
