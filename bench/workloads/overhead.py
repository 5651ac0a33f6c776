"""Workload "overhead": what a proxy adds to small requests.

Small chat completions (a 2-word prompt, ``max_tokens`` 4) leave the model almost no
work, so what is left is the cost of the path: parsing, placement, the extra hop,
streaming relay. Four cells: non-streaming and streaming, at concurrency 1 and 4
(``--parallel 4``). For each system, each cell alternates blocks sent to the system
and blocks sent straight to its own llama-server (see the report's Method), so the
added latency is a paired difference.

Targets (from the issue): corral's added p50 < 1 ms and p99 < 5 ms on small requests;
lower than llama-server router mode's; at least 5x lower than LiteLLM's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass, field

import aiohttp

from bench import pinning, plots
from bench.context import BenchContext, StartupError
from bench.loadgen import LoadGenerator, RequestSpec, RunResult, chat_request
from bench.report import md_table
from bench.stats import DASH, Difference, Summary, ms, percentile_difference, ratio, signed_ms
from bench.systems import Endpoint, make_systems
from bench.workloads import Section

log = logging.getLogger("bench.overhead")

NAME = "overhead"
TITLE = "Overhead on small requests"
ORDER = 10

MAX_TOKENS = 4
PROMPT = "Say hi"
#: requests per client in one block; blocks to the system and to its llama-server alternate
BLOCK_PER_CLIENT = 25
#: idle seconds before each switch between the system and its llama-server. Requests
#: sent straight to corral's llama-server are "foreign" load to corral, which it learns
#: about from its agent's next /slots report (every 0.1 s); the pause lets that report
#: land so one side's traffic does not hold slots against the other. Same for all.
SETTLE = 0.25
WARMUP = 20
COUNT_C1 = 300
COUNT_C4 = 600
TARGET_P50 = 0.001
TARGET_P99 = 0.005
LITELLM_FACTOR = 5.0
#: llama-server computes on one thread, on its own core (see bench/pinning.py)
LLAMA_THREADS = ("--threads", "1", "--threads-batch", "1")


@dataclass(frozen=True)
class Cell:
    stream: bool
    concurrency: int
    count: int

    @property
    def key(self) -> str:
        return f"{'stream' if self.stream else 'nonstream'}-c{self.concurrency}"

    @property
    def label(self) -> str:
        return f"{'streaming' if self.stream else 'non-streaming'}, concurrency {self.concurrency}"

    @property
    def short(self) -> str:
        return f"{'stream' if self.stream else 'non-stream'} c={self.concurrency}"


@dataclass
class Pair:
    """One cell of one system: requests through it and paired ones straight to its
    llama-server."""

    front: RunResult = field(default_factory=RunResult)
    backend: RunResult = field(default_factory=RunResult)
    _added: Added | None = field(default=None, repr=False)

    def summaries(self) -> tuple[Summary, Summary]:
        return Summary.of(self.front.results), Summary.of(self.backend.results)

    def added(self) -> Added:
        """Added latency with bootstrap intervals (computed once; the pair is complete)."""
        if self._added is None:
            front = [r.latency for r in self.front.ok]
            backend = [r.latency for r in self.backend.ok]
            self._added = Added(
                percentile_difference(front, backend, 50),
                percentile_difference(front, backend, 99),
            )
        return self._added


def cells(ctx: BenchContext) -> list[Cell]:
    c1, c4 = ctx.count(COUNT_C1), ctx.count(COUNT_C4)
    return [Cell(False, 1, c1), Cell(True, 1, c1), Cell(False, 4, c4), Cell(True, 4, c4)]


async def _block(url: str, ep: Endpoint, spec: RequestSpec, cell: Cell, count: int) -> RunResult:
    async with LoadGenerator(url, ep.headers) as gen:
        return await gen.closed_loop(lambda _: spec, concurrency=cell.concurrency, count=count)


def blocks(cell: Cell) -> list[int]:
    """Block sizes for one side of a cell: ``BLOCK_PER_CLIENT`` requests per client,
    so the two sides alternate every fraction of a second and share the machine's
    moods (other processes, frequency changes) alike."""
    size = BLOCK_PER_CLIENT * cell.concurrency
    full, rest = divmod(cell.count, size)
    return [size] * full + ([rest] if rest else [])


async def measure(system: str, ep: Endpoint, cell_list: list[Cell]) -> dict[str, Pair]:
    """Every cell for one started system, paired with its llama-server."""
    for stream in (False, True):
        spec = chat_request(ep.model, stream=stream, max_tokens=MAX_TOKENS, prompt=PROMPT)
        for url in (ep.url, ep.backend_url):
            await _block(url, ep, spec, Cell(stream, 2, WARMUP), WARMUP)
    out: dict[str, Pair] = {}
    for cell in cell_list:
        spec = chat_request(ep.model, stream=cell.stream, max_tokens=MAX_TOKENS, prompt=PROMPT)
        pair = Pair()
        last = ""
        for index, count in enumerate(blocks(cell)):
            order = ("front", "backend") if index % 2 == 0 else ("backend", "front")
            for which in order:
                if which != last:
                    await asyncio.sleep(SETTLE)
                    last = which
                url = ep.url if which == "front" else ep.backend_url
                getattr(pair, which).extend(await _block(url, ep, spec, cell, count))
        front, backend = pair.summaries()
        log.info(
            "%s %s: p50 %.2f ms (direct %.2f), p99 %.2f ms (direct %.2f), errors %d",
            system,
            cell.short,
            front.p50 * 1000,
            backend.p50 * 1000,
            front.p99 * 1000,
            backend.p99 * 1000,
            front.errors,
        )
        out[cell.key] = pair
    return out


@dataclass(frozen=True)
class Added:
    """Latency a system adds over its own llama-server, at p50 and p99."""

    p50: Difference
    p99: Difference


def added(pair: Pair) -> Added:
    return pair.added()


def _errors(pair: Pair) -> str:
    errs = pair.front.errors()
    if not errs:
        return "0"
    return ", ".join(f"{kind} {n}" for kind, n in errs.most_common())


async def run(ctx: BenchContext) -> Section:
    cell_list = cells(ctx)
    systems = make_systems(ctx.systems)
    run_ctx = dataclasses.replace(ctx, llama_args=(*ctx.llama_args, *LLAMA_THREADS))
    results: dict[str, dict[str, Pair]] = {}
    missing: dict[str, str] = {}
    observed: dict[str, list[str]] = {}
    for system in systems:
        reason = system.unavailable(ctx)
        if reason is not None:
            missing[system.label] = reason
            continue
        try:
            ep = await system.start(run_ctx)
            log.info("%s: up at %s (its llama-server %s)", system.name, ep.url, ep.backend_url)
            for proc in system.procs:
                for line in pinning.pin_tree(
                    proc.pid, pinning.PROXY_CORE, pinning.OTHER_CORE, str(ctx.llama_server)
                ):
                    log.info("%s: pinned %s", system.name, line)
            with pinning.this_process_on(pinning.OTHER_CORE):
                results[system.name] = await measure(system.name, ep, cell_list)
        except (StartupError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.error("%s could not be started: %s", system.name, exc)
            missing[system.label] = f"could not be started: {exc}"
        finally:
            system.stop()
        observed[system.label] = system.observations(ctx)
    labels = {s.name: s.label for s in systems}
    markdown = render(ctx, cell_list, results, labels, observed)
    images = plots.overhead_plots(ctx.docs_dir, cell_list, results, labels)
    return Section(TITLE, markdown, images, missing)


# -- report ---------------------------------------------------------------------------------


def render(
    ctx: BenchContext,
    cell_list: list[Cell],
    results: dict[str, dict[str, Pair]],
    labels: dict[str, str],
    observed: dict[str, list[str]] | None = None,
) -> str:
    parts = [
        f"Chat completions with a {len(PROMPT.split())}-word prompt and `max_tokens: {MAX_TOKENS}` "
        f"to `{ctx.model_name}`, non-streaming and streaming (with `stream_options."
        "include_usage`), closed loop at concurrency 1 and 4. Per system and cell: "
        + ", ".join(f"{c.count} requests ({c.short})" for c in cell_list)
        + f" through the system plus as many straight to its llama-server, in "
        f"alternating blocks of {BLOCK_PER_CLIENT} requests per client ({SETTLE:g} s idle "
        f"before each switch), after {WARMUP} warm-up requests of each kind. Times in ms.",
        "",
        *(
            [
                f"Cores: each llama-server computes on one thread "
                f"(`{' '.join(LLAMA_THREADS)}`) pinned to core {pinning.OTHER_CORE}, "
                f"with the load generator; the proxy under test (and a router-mode "
                f"llama-server's router process) has core {pinning.PROXY_CORE} to itself, "
                "as in a deployment where inference runs on a GPU or its own cores. "
                "Sharing both cores, llama-server's compute threads and the proxy take "
                "turns, and the added latency measures waiting for a core more than the "
                "proxy.",
                "",
            ]
            if pinning.available()
            else []
        ),
    ]
    corral = results.get("corral")
    parts += ["### Headline: latency added to a small request, p50 / p99 (ms)", ""]
    headers = ["system", *(c.short for c in cell_list), "p50 added vs corral's", "errors"]
    rows = []
    for name, by_cell in results.items():
        row = [labels[name]]
        for cell in cell_list:
            a = added(by_cell[cell.key])
            row.append(f"{signed_ms(a.p50.value)} / {signed_ms(a.p99.value)}")
        row.append(" · ".join(_versus(results, name, c) for c in cell_list))
        row.append(str(sum(by_cell[c.key].front.errors().total() for c in cell_list)))
        rows.append(row)
    parts += [md_table(headers, rows), ""]
    parts += [
        '"Added" is the system\'s percentile minus the same percentile of the paired '
        "requests sent straight to its own llama-server. The direct row measures "
        "llama-server against itself: it shows the method's noise. Ratios are per cell, in "
        'the column order: "≈ 0" when the 95% bootstrap interval of that system\'s added '
        'p50 reaches zero (nothing measurable added), "≥ Nx" when corral\'s does. p99 '
        "differences come from a handful of requests and swing by several ms run to run "
        "on a shared machine: compare them with the direct row.",
        "",
    ]
    direct = results.get("direct")
    if direct is not None:
        spread = max(abs(added(direct[c.key]).p50.value) for c in cell_list)
        parts += [
            f"In this run llama-server against itself differed by up to {ms(spread)} ms at "
            "p50: smaller differences than that are not meaningful, whatever their interval.",
            "",
        ]
    words = _in_words(cell_list, results, labels)
    if words:
        parts += ["In words (added p50, over the four cells):", "", *words, ""]
    if corral is not None:
        parts += ["### Targets", "", _targets(cell_list, results), ""]
    notes = [f"- {label}: {line}" for label, lines in (observed or {}).items() for line in lines]
    if notes:
        parts += ["### From the systems' own logs", "", *notes, ""]
    for cell in cell_list:
        parts += [f"### {cell.label[0].upper()}{cell.label[1:]}", ""]
        headers = [
            "system",
            "p50",
            "p99",
            "TTFT p50",
            "TTFT p99",
            "direct p50",
            "direct p99",
            "added p50 [95% CI]",
            "added p99",
            "added p50 vs corral",
            "req/s",
            "tokens/req",
            "cached/req",
            "errors",
        ]
        rows = []
        for name, by_cell in results.items():
            pair = by_cell[cell.key]
            front, backend = pair.summaries()
            a = added(pair)
            rate = len(pair.front.ok) / pair.front.wall if pair.front.wall else math.nan
            rows.append(
                [
                    labels[name],
                    ms(front.p50),
                    ms(front.p99),
                    ms(front.ttft_p50),
                    ms(front.ttft_p99),
                    ms(backend.p50),
                    ms(backend.p99),
                    f"{signed_ms(a.p50.value)} [{signed_ms(a.p50.low)}, {signed_ms(a.p50.high)}]",
                    signed_ms(a.p99.value),
                    _versus(results, name, cell),
                    f"{rate:.0f}",
                    f"{front.tokens:.1f}",
                    f"{front.cached:.1f}",
                    _errors(pair),
                ]
            )
        parts += [md_table(headers, rows), ""]
    parts += [
        "TTFT is the time to the first response byte (for non-streaming requests, nearly "
        "the whole response). req/s is the front door's throughput over its own blocks. "
        "tokens/req and cached/req (from `usage`) show every system did the same work.",
        "",
    ]
    return "\n".join(parts)


def _versus(results: dict[str, dict[str, Pair]], name: str, cell: Cell) -> str:
    corral = results.get("corral")
    if corral is None or name in ("corral", "direct"):
        return DASH
    return ratio(added(results[name][cell.key]).p50, added(corral[cell.key]).p50)


def _in_words(
    cell_list: list[Cell], results: dict[str, dict[str, Pair]], labels: dict[str, str]
) -> list[str]:
    corral = results.get("corral")
    if corral is None:
        return []
    lines = []
    for name, by_cell in results.items():
        if name in ("corral", "direct"):
            continue
        factors: list[float] = []
        bounds: list[float] = []
        near_zero = 0
        for cell in cell_list:
            mine, theirs = added(by_cell[cell.key]).p50, added(corral[cell.key]).p50
            if not mine.above_zero:
                near_zero += 1
            elif theirs.above_zero:
                factors.append(mine.value / theirs.value)
            elif theirs.high > 0:
                bounds.append(mine.value / theirs.high)
        if near_zero == len(cell_list):
            lines.append(f"- {labels[name]} adds nothing measurable in any cell.")
            continue
        if factors:
            low, high = min(factors), max(factors)
            span = f"{low:.1f}x" if high - low < 0.05 else f"{low:.1f}x to {high:.1f}x"
            text = f"- {labels[name]} adds {span} what corral adds"
        elif bounds:
            text = f"- {labels[name]} adds at least {min(bounds):.0f}x what corral adds"
        else:  # corral's added p50 is below zero in every cell where this one's is above
            text = f"- {labels[name]} adds time where corral adds none measurable"
        if near_zero:
            text += f" (nothing measurable in {near_zero} of {len(cell_list)} cells)"
        lines.append(text + ".")
    return lines


def _targets(cell_list: list[Cell], results: dict[str, dict[str, Pair]]) -> str:
    corral = results["corral"]
    c_added = {c.key: added(corral[c.key]) for c in cell_list}
    worst50 = max(a.p50.value for a in c_added.values())
    worst99 = max(a.p99.value for a in c_added.values())
    rows = [
        [
            f"corral's added p50 < {TARGET_P50 * 1000:g} ms (every cell)",
            " · ".join(signed_ms(c_added[c.key].p50.value) for c in cell_list),
            _yes(worst50 < TARGET_P50),
        ],
        [
            f"corral's added p99 < {TARGET_P99 * 1000:g} ms (every cell)",
            " · ".join(signed_ms(c_added[c.key].p99.value) for c in cell_list),
            _yes(worst99 < TARGET_P99),
        ],
    ]
    router = results.get("router")
    if router is not None:
        pairs = [(c_added[c.key].p50, added(router[c.key]).p50) for c in cell_list]
        rows.append(
            [
                "corral adds less than router mode (p50, every cell)",
                " · ".join(f"{signed_ms(c.value)} vs {signed_ms(r.value)}" for c, r in pairs),
                _yes(all(c.value < r.value for c, r in pairs)),
            ]
        )
    else:
        rows.append(["corral adds less than router mode", "router mode not measured", DASH])
    litellm = results.get("litellm")
    if litellm is not None:
        shown = [ratio(added(litellm[c.key]).p50, c_added[c.key].p50) for c in cell_list]
        factors = []
        for cell in cell_list:
            mine, theirs = added(litellm[cell.key]).p50, c_added[cell.key].p50
            if theirs.above_zero:
                factors.append(mine.value / theirs.value)
            else:
                factors.append(mine.value / theirs.high if theirs.high > 0 else math.inf)
        rows.append(
            [
                f"LiteLLM adds ≥ {LITELLM_FACTOR:g}x what corral adds (p50, every cell)",
                " · ".join(shown),
                _yes(all(f >= LITELLM_FACTOR for f in factors)),
            ]
        )
    else:
        rows.append(["LiteLLM adds ≥ 5x what corral adds", "LiteLLM not measured", DASH])
    return md_table(["target", "measured (cells in headline order, ms)", "met"], rows, 3)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"
