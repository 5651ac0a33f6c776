"""Workload "multiturn": multi-turn chats over three llama-servers, by placement policy.

The question: does sending each turn to the server that already holds its conversation
save the prefill, and does it do so without piling load on one server?

Set-up, the same for every system and fresh for each (new llama-server processes, so
no system inherits another's caches):

- three real llama-servers on one model, each ``--parallel 2 -c 8192 --threads 1
  --metrics``;
- the model is the bench's tiny llama made wider (``n_embd 256``, 4 layers) so that
  prefill dominates: about 2,500 prompt tokens take about 800 ms to prefill on one
  thread, and a turn whose prefix is cached about 70;
- 24 conversations, each with its own long system prompt (600 words of the model's
  vocabulary, about 2,500 tokens), 8 turns each; the user's next turn is sent after the
  previous answer arrived (with the answer in the history), and all conversations run
  at once with at most 4 requests in flight (two thirds of the fleet's 6 slots), so
  turns of different conversations interleave. Streams, ``max_tokens`` 8.

Two scenarios (:data:`SCENARIOS`). llama-server keeps finished requests' prompts in a
RAM cache (``--cache-ram``, 8192 MiB by default) and restores the longest match for a
new prompt. The tiny model's KV cache is 80 times smaller a token than a 70B model's,
so with the default every server's RAM cache holds the whole workload: the first
scenario. The second scales ``--cache-ram`` by that factor, so a server holds about as
many conversations as it would serving a 70B model (:data:`SCALED_CACHE_RAM_MIB`).

Systems: ``corral balancer`` with three ``corral agent``s, once per policy
(``prefix``, ``least_busy``, ``round_robin``), and the LiteLLM proxy with the three
servers as one model group (``simple-shuffle``).

Measured:

- **cached-token fraction**, from the servers themselves: each llama-server's
  ``llamacpp:prompt_tokens_total`` counts the prompt tokens it had to process, so
  ``1 - processed / prompt tokens`` (prompt tokens from the responses' usage) is the
  share served from cache, the same way for every system;
- the **oracle**: a placement that always finds the previous turn's prompt cached would
  get, for each turn after the first, the previous turn's prompt tokens cached (the
  answer's tokens are re-tokenized differently, so they never count). Its fraction is
  the bound each system is compared against;
- TTFT and latency p50/p99 (client side), throughput (requests per second of wall
  time), and per-server load: requests each server answered (its
  ``llamacpp:tokens_predicted_total`` / ``max_tokens``) and the largest share against
  the mean.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.context import BenchContext, StartupError
from bench.fleet import (
    Processes,
    model_words,
    server_counters,
    start_corral,
    start_llama_servers,
    tiny_model,
)
from bench.loadgen import LoadGenerator, RequestResult, RequestSpec
from bench.report import md_table
from bench.stats import percentile
from bench.systems.litellm import LITELLM_REQUIREMENT, ensure_installed, start_proxy
from bench.workloads import Section

log = logging.getLogger("bench.multiturn")

NAME = "multiturn"
TITLE = "Multi-turn chat: cache-aware placement over three llama-servers"
ORDER = 30

SERVERS = 3
PARALLEL = 2
CONTEXT = 8192
CONVERSATIONS = 24
TURNS = 8
POLICIES = ("prefix", "least_busy", "round_robin")
PINNED = "prefix_pinned"  # corral prefix with --pin-slots
IN_FLIGHT = 4  # requests in flight: two thirds of the fleet's slots
#: The tiny model's KV cache takes 4 KiB a token (4 layers x K and V x 256 x f16); a
#: 70B-class model with grouped-query attention (80 layers, 8 KV heads of 128) takes
#: 320 KiB, 80 times as much. llama-server's default ``--cache-ram`` of 8192 MiB thus
#: holds as many of a 70B model's tokens as 8192 / 80 ≈ 100 MiB holds of the tiny one's.
SCALED_CACHE_RAM_MIB = 100


@dataclass(frozen=True)
class Scenario:
    """One measurement: the servers' extra arguments and the systems compared."""

    key: str
    title: str
    server_args: tuple[str, ...]
    systems: tuple[str, ...]


SCENARIOS = (
    Scenario(
        "default",
        "Default RAM prompt cache (llama-server's 8 GiB: the whole workload fits)",
        (),
        ("prefix", PINNED, "least_busy", "round_robin", "litellm"),
    ),
    Scenario(
        "scaled",
        f"RAM prompt cache sized like a 70B model's (`--cache-ram {SCALED_CACHE_RAM_MIB}`)",
        ("--cache-ram", str(SCALED_CACHE_RAM_MIB)),
        ("prefix", PINNED, "least_busy", "litellm"),
    ),
)
SYSTEM_WORDS = 600
USER_WORDS = 12
MAX_TOKENS = 8
MODEL_SHAPE = {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_ctx": CONTEXT}
MODEL_NAME = "chat"
REQUEST_LIMIT = 300.0

PROMPT, PREDICTED = "prompt_tokens_total", "tokens_predicted_total"  # llama-server counters


@dataclass
class Turn:
    conversation: int
    turn: int
    result: RequestResult


@dataclass
class Outcome:
    label: str
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0
    processed: list[float] = field(default_factory=list)  # prompt tokens each server computed
    answered: list[float] = field(default_factory=list)  # requests each server answered


def _model(ctx: BenchContext) -> Path:
    return tiny_model(ctx, MODEL_NAME, seed=7, **MODEL_SHAPE)


def _conversation_plan(vocabulary: list[str], count: int) -> list[tuple[str, list[str]]]:
    """Each conversation's system prompt and user turns (seeded: the same every run)."""
    plans = []
    for index in range(count):
        rng = random.Random(1000 + index)
        system = f"Conversation {index}. " + " ".join(
            rng.choice(vocabulary) for _ in range(SYSTEM_WORDS)
        )
        users = [
            f"Turn {turn}: " + " ".join(rng.choice(vocabulary) for _ in range(USER_WORDS))
            for turn in range(TURNS)
        ]
        plans.append((system, users))
    return plans


async def _run_conversations(
    url: str, headers: dict[str, str], plans: list[tuple[str, list[str]]], in_flight: int
) -> tuple[list[Turn], float]:
    turns: list[Turn] = []
    slots = asyncio.Semaphore(in_flight)
    async with LoadGenerator(url, headers=headers, timeout=REQUEST_LIMIT) as gen:
        epoch = time.perf_counter()

        async def conversation(index: int, system: str, users: list[str]) -> None:
            rng = random.Random(index)
            await asyncio.sleep(rng.uniform(0, 2.0))  # arrivals spread over two seconds
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            for turn, user in enumerate(users):
                messages.append({"role": "user", "content": user})
                body = {
                    "model": MODEL_NAME,
                    "messages": list(messages),
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with slots:
                    result = await gen.send(RequestSpec("/v1/chat/completions", body), epoch)
                turns.append(Turn(index, turn, result))
                if not result.ok:
                    return  # a conversation whose turn failed ends there
                messages.append({"role": "assistant", "content": result.text})
                await asyncio.sleep(rng.uniform(0, 0.2))  # the user reads and types

        await asyncio.gather(*(conversation(i, s, u) for i, (s, u) in enumerate(plans)))
        wall = time.perf_counter() - epoch
    return turns, wall


async def _measure(
    ctx: BenchContext,
    system: str,
    model: Path,
    plans: list[tuple[str, list[str]]],
    in_flight: int,
    server_args: Sequence[str] = (),
) -> Outcome:
    processes = Processes()
    if system == PINNED:
        label = "corral `prefix` + `--pin-slots`"
    elif system in POLICIES:
        label = f"corral `{system}`"
    else:
        label = "LiteLLM proxy (simple-shuffle)"
    outcome = Outcome(label)
    try:
        backends = await start_llama_servers(
            ctx,
            processes,
            model,
            MODEL_NAME,
            f"multiturn-{system}-{in_flight}",
            [PARALLEL] * SERVERS,
            CONTEXT,
            server_args,
        )
        if system in POLICIES or system == PINNED:
            name = f"multiturn-corral-{system}"
            policy, extra = ("prefix", ["--pin-slots"]) if system == PINNED else (system, [])
            url, headers = await start_corral(
                ctx, processes, name, policy, backends, balancer_args=extra
            )
        else:
            ensure_installed()
            url, headers = await start_proxy(
                ctx, "multiturn-litellm", MODEL_NAME, backends, processes.spawn
            )
        before = [await server_counters(b) for b in backends]
        outcome.turns, outcome.wall = await _run_conversations(url, headers, plans, in_flight)
        after = [await server_counters(b) for b in backends]
        outcome.processed = [
            a.get(PROMPT, 0.0) - b.get(PROMPT, 0.0) for a, b in zip(after, before, strict=True)
        ]
        outcome.answered = [
            (a.get(PREDICTED, 0.0) - b.get(PREDICTED, 0.0)) / MAX_TOKENS
            for a, b in zip(after, before, strict=True)
        ]
    finally:
        processes.stop()
    return outcome


@dataclass
class Figures:
    requests: int
    failed: int
    prompt: int
    cached_fraction: float
    oracle_fraction: float
    reported_fraction: float | None
    ttft: list[float]
    latency: list[float]
    throughput: float
    spread: float
    shares: list[float]


def _figures(outcome: Outcome) -> Figures:
    by_turn = {(t.conversation, t.turn): t.result for t in outcome.turns}
    ok = [t for t in outcome.turns if t.result.ok]
    prompt = sum(t.result.prompt_tokens or 0 for t in ok)
    oracle = 0
    for t in ok:
        previous = by_turn.get((t.conversation, t.turn - 1))
        if previous is not None and previous.ok:
            oracle += min(previous.prompt_tokens or 0, t.result.prompt_tokens or 0)
    processed = sum(outcome.processed)
    reported = [t.result.cached_tokens for t in ok]
    answered = outcome.answered
    mean = sum(answered) / len(answered) if answered else 0.0
    return Figures(
        requests=len(outcome.turns),
        failed=len(outcome.turns) - len(ok),
        prompt=prompt,
        cached_fraction=1 - processed / prompt if prompt else 0.0,
        oracle_fraction=oracle / prompt if prompt else 0.0,
        reported_fraction=(
            sum(r or 0 for r in reported) / prompt if prompt and None not in reported else None
        ),
        ttft=[t.result.ttft for t in ok if t.result.ttft is not None],
        latency=[t.result.latency for t in ok],
        throughput=len(ok) / outcome.wall if outcome.wall else 0.0,
        spread=max(answered) / mean if mean else 0.0,
        shares=answered,
    )


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def _scenario_section(
    scenario: Scenario, outcomes: dict[str, Outcome], figures: dict[str, Figures]
) -> tuple[str, float]:
    """One scenario's table and target check; also the oracle's fraction."""
    rows = []
    for system, f in figures.items():
        rows.append(
            [
                outcomes[system].label,
                str(f.requests),
                str(f.failed),
                f"{f.cached_fraction:.1%}",
                f"{f.cached_fraction / f.oracle_fraction:.0%}" if f.oracle_fraction else "-",
                _ms(f.ttft, 50),
                _ms(f.ttft, 99),
                _ms(f.latency, 50),
                _ms(f.latency, 99),
                f"{f.throughput:.2f}",
                " / ".join(f"{s:.0f}" for s in f.shares),
                f"{f.spread:.2f}",
            ]
        )
    table = md_table(
        [
            "system",
            "requests",
            "failed",
            "cached tokens",
            "of oracle",
            "TTFT p50",
            "TTFT p99",
            "p50",
            "p99",
            "req/s",
            "requests per server",
            "max / mean",
        ],
        rows,
    )
    oracle = next(iter(figures.values())).oracle_fraction if figures else 0.0
    targets = ""
    if "prefix" in figures:
        p = figures["prefix"]
        lines = [
            (
                "cached tokens ≥ 90% of the oracle's",
                f"{p.cached_fraction / oracle:.0%}" if oracle else "-",
                bool(oracle) and p.cached_fraction / oracle >= 0.9,
            ),
            ("no server's request share above 1.5x the mean", f"{p.spread:.2f}x", p.spread <= 1.5),
        ]
        if "least_busy" in figures and p.ttft and figures["least_busy"].ttft:
            lb = figures["least_busy"]
            ratio = percentile(lb.ttft, 50) / percentile(p.ttft, 50)
            lines.insert(
                1, ("TTFT p50 ≥ 3x lower than `least_busy`", f"{ratio:.1f}x lower", ratio >= 3)
            )
        if "least_busy" in figures and figures["least_busy"].throughput:
            gain = p.throughput / figures["least_busy"].throughput
            lines.append(("(no target) throughput against `least_busy`", f"{gain:.2f}x", None))
        targets = f"\n\nTargets, corral `prefix`, {scenario.key} RAM cache:\n\n" + md_table(
            ["target", "measured", "met"],
            [[t, m, "n/a" if ok is None else "yes" if ok else "**no**"] for t, m, ok in lines],
        )
    check = ""
    if "prefix" in figures and figures["prefix"].reported_fraction is not None:
        check = (
            "\n\nCross-check: the cached tokens corral's responses reported "
            "(`prompt_tokens_details.cached_tokens`) add up to "
            f"{figures['prefix'].reported_fraction:.1%} of the prompt tokens under `prefix`."
        )
    return f"**{scenario.title}**\n\n" + table + targets + check, oracle


async def run(ctx: BenchContext) -> Section:
    model = _model(ctx)
    plans = _conversation_plan(model_words(model), ctx.count(CONVERSATIONS, minimum=12))
    wanted: list[str] = []
    if not ctx.systems or "corral" in ctx.systems:
        wanted += [*POLICIES, PINNED]
    if not ctx.systems or "litellm" in ctx.systems:
        wanted.append("litellm")
    missing: dict[str, str] = {}
    parts = []
    oracle = 0.0
    for scenario in SCENARIOS:
        outcomes: dict[str, Outcome] = {}
        for system in scenario.systems:
            if system not in wanted or system in missing:
                continue
            log.info("multiturn: measuring %s, %s RAM cache", system, scenario.key)
            try:
                outcomes[system] = await _measure(
                    ctx, system, model, plans, IN_FLIGHT, scenario.server_args
                )
            except StartupError as exc:
                missing[system] = str(exc)
        figures = {system: _figures(outcome) for system, outcome in outcomes.items()}
        part, oracle = _scenario_section(scenario, outcomes, figures)
        parts.append(part)
    markdown = (
        f"{len(plans)} conversations x {TURNS} turns, each with its own ~{SYSTEM_WORDS}-word "
        f"system prompt (about 2,500 tokens), over {SERVERS} llama-servers (`--parallel "
        f"{PARALLEL} -c {CONTEXT} --threads 1`, {SERVERS * PARALLEL} slots in all; a tiny "
        f"llama with n_embd {MODEL_SHAPE['n_embd']} and {MODEL_SHAPE['n_layer']} layers), "
        f"streamed, `max_tokens` {MAX_TOKENS}, {IN_FLIGHT} requests in flight (two thirds "
        "of the slots). Fresh servers for every system. Times in ms; TTFT is measured by "
        "the client, so it includes any wait in a front door's buffer. Cached tokens are "
        "measured at the servers (`llamacpp:prompt_tokens_total` is what they had to "
        "prefill); the oracle, which always finds the previous turn's prompt cached, gets "
        f"{oracle:.1%}. LiteLLM: {LITELLM_REQUIREMENT}, the three servers as one model "
        "group.\n\n"
        "llama-server keeps the prompts of finished requests in RAM (`--cache-ram`, "
        "8192 MiB by default) and restores one when a new prompt starts with it, so a turn "
        "sent to a server that saw its conversation before finds it there even if another "
        "conversation took the slot since. The tiny model's KV cache is 80 times smaller "
        "a token than a 70B model's, so with the default the whole workload fits in every "
        "server's RAM cache, and a placement that spreads each conversation over all three "
        "servers still finds most of it: that is the first table. In production, with a "
        "large model, the same 8 GiB holds a few conversations; the second table scales "
        f"the RAM cache by the same factor of 80 (`--cache-ram {SCALED_CACHE_RAM_MIB}`, "
        "about 26,000 of the tiny model's tokens, or 8 of these conversations, a server), "
        "which is the case cache-aware placement is for. `--pin-slots` adds slot pins "
        "(`id_slot`) to `prefix`. `round_robin` is left out of the "
        "second table to keep the run short; it behaves like `least_busy` in the first.\n\n"
        + "\n\n".join(parts)
    )
    return Section(TITLE, markdown, missing=missing)
