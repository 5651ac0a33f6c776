"""A fake ``llama-server``: a small real HTTP program for integration tests.

corral's integration tests need many llama-server instances that start in milliseconds,
generate at a chosen speed and fail on demand. The real server is too slow to start and
too well behaved for that, so this module answers like it instead: the same paths, the
same JSON keys and JSON types (a test in ``tests/real`` compares them with the real
server), with settable slots, load delay, per-token delay and faults.

Run it as its own process (tests start it so, to prove process-level behaviour)::

    python -m corral.testing.fake_llama_server --port 0 --slots 2 --token-delay 0.01

With ``--port 0`` it prints one line ``listening on http://HOST:PORT`` once bound. Or
use :func:`build_app` with :class:`FakeOptions` in-process.

What it imitates from llama-server (build 11434):

* ``/health`` and every other path answer 503 ``Loading model`` during the load delay.
* Slots: a request takes an idle slot (its ``id_slot`` if given, else the idle slot whose
  cached prompt shares the longest prefix with the new one, above the real server's 10%
  similarity threshold, else the least recently used idle slot) or waits, deferred, until
  one frees. Streamed responses send their headers only once a slot is taken, as the
  real server does.
* Prefix cache: each slot remembers the tokens it last held (prompt plus generated
  tokens but the last), and a request reports the common prefix as ``timings.cache_n``
  and ``usage.prompt_tokens_details.cached_tokens``, capped at the prompt length minus
  one because the real server always evaluates at least the last prompt token.
* After a streamed response ends, the connection is closed although the response said
  ``Keep-Alive``: llama-server does this, and a pooled client that reuses the connection
  fails. ``--keep-alive-after-stream`` turns the trap off.

Token-counting rule: a token is a whitespace-separated word (``re.findall(r"\\S+")``) of
the prompt text. A chat prompt is first rendered with a ChatML template
(``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n``), so ``<|im_start|>user`` counts as one token. Generated
tokens are words too (``" the"``, ``" of"``, ...), so echoing an answer back in the next
turn hits the cache as it would on the real server.

Faults (``--fault KIND`` at start, ``POST /_fake/fault {"fault": KIND, "count": N}`` at
run time; ``count`` limits how many requests the fault hits, then it reverts to ``none``):

=================  ====================================================================
kind               effect
=================  ====================================================================
none               behave
exit-mid-stream    completions: the process exits (``os._exit(1)``) after sending
                   :data:`EXIT_AFTER_TOKENS` tokens (streamed) or generating them (not
                   streamed). In-process, the connection is aborted instead.
http-500           completions and embeddings answer 500 ``server_error``
hang               completions and embeddings are accepted and never answered
hang-all           every path but ``/_fake/*`` is accepted and never answered
refuse             process: the listening socket is closed, so connections are refused;
                   connections already open are dropped at their next request. There is
                   no way back. In-process: every request's connection is dropped.
ignore-sigterm     process: SIGTERM is ignored (SIG_IGN), only SIGKILL stops it
=================  ====================================================================

Static files: ``--path DIR`` (or ``LLAMA_ARG_STATIC_PATH``, as llama-server reads it)
serves ``DIR/index.html`` at ``/``, the way llama-server serves its web UI from there.

``GET /_fake/state`` returns counters (requests served, in flight, max in flight, ...).
``/_fake/*`` needs no API key and answers while loading.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import ssl
import struct
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, NoReturn

from aiohttp import web

__all__ = [
    "EXIT_AFTER_TOKENS",
    "SERVER_KEY",
    "FakeLlamaServer",
    "FakeOptions",
    "Fault",
    "build_app",
    "main",
]

log = logging.getLogger("corral.testing.fake_llama_server")

EXIT_AFTER_TOKENS: Final = 2
"""Tokens sent before ``exit-mid-stream`` kills the process: enough for a client to have
seen the stream start, so the test proves a failure *mid*-stream."""

SLOT_PROMPT_SIMILARITY: Final = 0.10
"""llama-server's ``--slot-prompt-similarity`` default: a slot is picked for its cached
prefix only when the prefix covers more than this fraction of the new prompt."""

N_VOCAB: Final = 32000
BUILD_INFO: Final = "b11434-fake"
KEEP_ALIVE_HEADER: Final = "timeout=5, max=100"
HANG_POLL_SECONDS: Final = 0.05
"""How often a hung or deferred request looks whether its client left; the fake frees
what the request held when it did, as the real server drops a closed request's task."""

_WORDS: Final = (
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an "
    "each which she do how their if will up other about out many then them these so"
).split()

_CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_CHAT_TEMPLATE_CAPS: Final = {
    "supports_object_arguments": False,
    "supports_parallel_tool_calls": False,
    "supports_preserve_reasoning": False,
    "supports_reasoning_effort": False,
    "supports_string_content": True,
    "supports_system_role": True,
    "supports_tool_calls": False,
    "supports_tools": False,
    "supports_typed_content": False,
}

# llama-server's sampling defaults, as its /props and /slots show them ("only metrics").
_DEFAULT_PARAMS: Final[dict[str, Any]] = {
    "seed": 4294967295,
    "temperature": 0.800000011920929,
    "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0,
    "top_k": 40,
    "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0,
    "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1,
    "n_predict": -1,
    "n_keep": 0,
    "n_discard": 0,
    "ignore_eos": False,
    "stream": False,
    "n_probs": 0,
    "min_keep": 0,
    "chat_format": "Content-only",
    "reasoning_format": "none",
    "reasoning_in_content": False,
    "generation_prompt": "",
    "samplers": [
        "penalties",
        "dry",
        "top_n_sigma",
        "top_k",
        "typ_p",
        "top_p",
        "min_p",
        "xtc",
        "temperature",
    ],
    "speculative.types": "none",
    "timings_per_token": False,
    "post_sampling_probs": False,
    "backend_sampling": False,
    "lora": [],
}

# Keys only the full parameter set (a native /completion's generation_settings) carries.
_FULL_ONLY_PARAMS: Final[dict[str, Any]] = {
    "dry_sequence_breakers": ["\n", ":", '"', "*"],
    "stop": [],
    "logit_bias": [],
    "grammar": "",
    "grammar_lazy": False,
    "grammar_triggers": [],
    "preserved_tokens": [],
}

# Request fields copied into the task's parameters, with the JSON type they must have; a
# value of the wrong type falls back to the default, as llama-server's json_value() does.
_FLOAT_PARAMS: Final = (
    "temperature",
    "dynatemp_range",
    "dynatemp_exponent",
    "top_p",
    "min_p",
    "top_n_sigma",
    "xtc_probability",
    "xtc_threshold",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "mirostat_tau",
    "mirostat_eta",
)
_INT_PARAMS: Final = (
    "seed",
    "top_k",
    "repeat_last_n",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "mirostat",
    "n_keep",
    "n_discard",
    "n_probs",
    "min_keep",
)
_BOOL_PARAMS: Final = ("ignore_eos", "timings_per_token", "post_sampling_probs")


class Fault(StrEnum):
    """A failure the fake can be told to show; see the module docstring for each."""

    NONE = "none"
    EXIT_MID_STREAM = "exit-mid-stream"
    HTTP_500 = "http-500"
    HANG = "hang"
    HANG_ALL = "hang-all"
    REFUSE = "refuse"
    IGNORE_SIGTERM = "ignore-sigterm"


_REQUEST_FAULTS: Final = frozenset({Fault.EXIT_MID_STREAM, Fault.HTTP_500, Fault.HANG})


@dataclass
class FakeOptions:
    """How a fake instance behaves. Defaults make a fast, healthy one-slot server."""

    model: str = "fake-model"
    """Name shown as ``model_alias``, ``/v1/models`` id and every response's ``model``."""
    name: str | None = None
    """``X-Fake-Instance`` header value; default: the port the fake listens on."""
    slots: int = 1
    """``--parallel``: requests served at once; more wait (deferred)."""
    ctx_size: int = 4096
    """``--ctx-size``: the whole context, split evenly across slots as the real server
    does when given ``-np``; each slot reports ``ctx_size // slots`` as ``n_ctx``."""
    load_delay: float = 0.0
    """Seconds after start during which everything answers 503 ``Loading model``."""
    token_delay: float = 0.0
    """Seconds per generated token."""
    tokens: int = 8
    """Tokens a completion generates when ``n_predict``/``max_tokens`` asks for more or
    for none (the real model would stop at its end-of-generation token)."""
    fault: Fault = Fault.NONE
    fault_count: int | None = None
    """How many requests ``fault`` hits before it reverts to ``none``; None: all."""
    api_keys: tuple[str, ...] = ()
    """``--api-key`` (comma-separated on the command line); empty: no check."""
    n_embd: int = 64
    """Length of embedding vectors."""
    metrics: bool = True
    """Serve ``/metrics``; off, it answers 501 like a real server without ``--metrics``."""
    slots_endpoint: bool = True
    """Serve ``/slots``; off, it answers 501 like a real server with ``--no-slots``."""
    embeddings: bool = True
    """Serve embeddings; off, they answer 501 like a real server without
    ``--embeddings``."""
    close_after_stream: bool = True
    """Close the connection after a streamed response, as llama-server does."""
    static_path: str | None = None
    """``--path``: a folder whose ``index.html`` is served at ``/`` (the web UI)."""
    own_process: bool = False
    """Set by :func:`main`: allows faults that act on the process (exit, signals,
    the listening socket). In-process they fall back to acting on the connection."""
    ssl_files: tuple[str, str] | None = None
    """``--ssl-cert-file`` and ``--ssl-key-file``: the process serves https with them,
    as llama-server built with OpenSSL does."""


class _ApiError(Exception):
    """An error answered as llama-server's ``{"error": {"code", "message", "type"}}``."""

    def __init__(
        self, code: int, error_type: str, message: str, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error_type = error_type
        self.message = message
        self.extra = extra or {}

    def response(self) -> web.Response:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body["type"] = self.error_type
        body.update(self.extra)
        return _json_response({"error": body}, status=self.code)


class _Dropped(Exception):
    """The request's connection is gone (client left, or a fault dropped it)."""


@dataclass
class _Task:
    """One completion running (or last run) on a slot: what /slots and timings show."""

    id: int
    params: dict[str, Any]
    prompt_words: list[str]
    n_cached: int
    n_target: int
    stop_type: str
    n_predict: int
    seed_offset: int
    generated: list[str] = field(default_factory=list)
    has_next_token: bool = True
    t_start: float = field(default_factory=time.perf_counter)
    t_prompt_ms: float = 0.0
    t_gen_start: float = 0.0
    t_gen_ms: float = 0.0

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_words)

    @property
    def n_decoded(self) -> int:
        return len(self.generated)

    def timings(self) -> dict[str, Any]:
        """llama-server's ``timings`` object for this task so far."""
        n_prompt_processed = self.n_prompt - self.n_cached
        prompt_ms = max(self.t_prompt_ms, 0.001)
        gen_ms = max(self.t_gen_ms, 0.001)
        return {
            "cache_n": self.n_cached,
            "prompt_n": n_prompt_processed,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(n_prompt_processed, 1),
            "prompt_per_second": 1e3 / prompt_ms * n_prompt_processed,
            "predicted_n": self.n_decoded,
            "predicted_ms": gen_ms,
            "predicted_per_token_ms": gen_ms / max(self.n_decoded, 1),
            "predicted_per_second": 1e3 / gen_ms * self.n_decoded,
        }

    def usage(self) -> dict[str, Any]:
        return {
            "completion_tokens": self.n_decoded,
            "prompt_tokens": self.n_prompt,
            "total_tokens": self.n_decoded + self.n_prompt,
            "prompt_tokens_details": {"cached_tokens": self.n_cached},
        }


@dataclass
class _Slot:
    id: int
    n_ctx: int
    cache: list[str] = field(default_factory=list)
    task: _Task | None = None
    last_task: _Task | None = None
    last_used: float = 0.0

    @property
    def is_processing(self) -> bool:
        return self.task is not None

    def to_json(self) -> dict[str, Any]:
        """The slot as llama-server's ``GET /slots`` shows it (without the debug env)."""
        res: dict[str, Any] = {
            "id": self.id,
            "n_ctx": self.n_ctx,
            "speculative": False,
            "is_processing": self.is_processing,
        }
        task = self.task or self.last_task
        if task is not None:
            n_remain = -1 if task.n_predict < 0 else task.n_predict - task.n_decoded
            res["id_task"] = task.id
            res["n_prompt_tokens"] = len(self.cache)
            res["n_prompt_tokens_processed"] = task.n_prompt - task.n_cached
            res["n_prompt_tokens_cache"] = task.n_cached
            res["params"] = _metrics_params(task.params)
            res["next_token"] = [
                {
                    "has_next_token": task.has_next_token,
                    "has_new_line": False,
                    "n_remain": n_remain,
                    "n_decoded": task.n_decoded,
                }
            ]
        return res


@dataclass
class _Counters:
    """What ``GET /_fake/state`` reports; counts only generation requests unless named
    otherwise, because those are what a balancer places."""

    requests_total: int = 0
    """Every request but ``/_fake/*``."""
    requests_served: int = 0
    """Completions and embeddings answered in full."""
    requests_failed: int = 0
    """Completions and embeddings that ended in an error answer or a dropped connection."""
    in_flight: int = 0
    """Completions and embeddings accepted and not finished, deferred ones included."""
    max_in_flight: int = 0
    deferred: int = 0
    """Requests waiting for a slot now."""
    last_model: Any = None
    """The ``model`` field of the last completion or embeddings request's body."""


@dataclass
class _Metrics:
    prompt_tokens: int = 0
    prompt_cached: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    predicted_seconds: float = 0.0
    n_decode: int = 0
    n_tokens_max: int = 0


@dataclass
class _ProcessHooks:
    """What only a whole process can do, installed by :func:`main`."""

    refuse: Callable[[], Awaitable[None]]
    set_ignore_sigterm: Callable[[bool], None]


class FakeLlamaServer:
    """All state of one fake instance; lives on one event loop, touched only from it."""

    def note_connection(self, request: web.Request) -> None:
        """Add ``request`` to :attr:`connections`."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        key = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.connections.setdefault(key, []).append(f"{request.method} {request.path}")
        self.connections.move_to_end(key)
        while len(self.connections) > 256:
            self.connections.popitem(last=False)

    def __init__(self, options: FakeOptions) -> None:
        if options.slots < 1:
            raise ValueError("slots must be >= 1")
        if options.tokens < 1:
            raise ValueError("tokens must be >= 1")
        self.options = options
        self.instance_name = options.name
        """``X-Fake-Instance``; None until known (then the port the fake listens on)."""
        n_ctx = max(options.ctx_size // options.slots, 1)
        self.slots = [_Slot(id=i, n_ctx=n_ctx) for i in range(options.slots)]
        self.counters = _Counters()
        self.request_headers: deque[dict[str, str]] = deque(maxlen=1000)
        """The headers of the last requests (``/_fake/*`` aside), for tests."""
        self.metrics = _Metrics()
        self.connections: OrderedDict[str, list[str]] = OrderedDict()
        """Requests by the connection they came on (its peer address), in order, for
        the last 256 connections: shows whether a client reused or pre-opened them."""
        self.fault = Fault(options.fault)
        self.fault_remaining = options.fault_count
        self.hooks: _ProcessHooks | None = None
        self.refusing = False
        self.started_at = time.monotonic()
        self.closing = asyncio.Event()
        self._slot_freed = asyncio.Condition()
        self._next_task_id = 0
        self._words_by_id: dict[int, str] = {}
        self.t_start_unix = int(time.time())

    # ----------------------------------------------------------------- state
    @property
    def n_ctx(self) -> int:
        return self.slots[0].n_ctx

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.started_at >= self.options.load_delay

    def state(self) -> dict[str, Any]:
        c = self.counters
        return {
            "instance": self.instance_name or "",
            "ready": self.ready,
            "fault": str(self.fault),
            "fault_remaining": self.fault_remaining,
            "requests_total": c.requests_total,
            "requests_served": c.requests_served,
            "requests_failed": c.requests_failed,
            "in_flight": c.in_flight,
            "max_in_flight": c.max_in_flight,
            "deferred": c.deferred,
            "last_model": c.last_model,
            "processing": sum(1 for s in self.slots if s.is_processing),
            "slots": self.options.slots,
        }

    async def set_fault(self, fault: Fault, count: int | None) -> None:
        """Switch the fault; process-wide faults act on the process at once."""
        log.info("fault=%s count=%s instance=%s", fault, count, self.instance_name)
        self.fault = fault
        self.fault_remaining = count
        if self.hooks is not None:
            self.hooks.set_ignore_sigterm(fault is Fault.IGNORE_SIGTERM)
        # in-process refusing can be undone; a process has closed its socket for good
        self.refusing = fault is Fault.REFUSE or (self.refusing and self.hooks is not None)
        if fault is Fault.REFUSE:
            if self.hooks is not None:
                await self.hooks.refuse()

    async def hang(self, request: web.Request) -> NoReturn:
        """Accept and never answer; give up only when the client or the server leaves."""
        log.info("hanging path=%s", request.path)
        while not _client_gone(request) and not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), HANG_POLL_SECONDS)
        raise _Dropped

    def take_fault(self, kinds: frozenset[Fault]) -> Fault:
        """Return the current fault if it is one of ``kinds``, using up one of its count."""
        fault = self.fault
        if fault not in kinds:
            return Fault.NONE
        if self.fault_remaining is not None:
            self.fault_remaining -= 1
            if self.fault_remaining <= 0:
                self.fault = Fault.NONE
                self.fault_remaining = None
        return fault

    # ---------------------------------------------------------------- tokens
    def token_id(self, word: str) -> int:
        """Stable id for a word, remembered so /detokenize can map it back."""
        token = zlib.crc32(word.encode()) % N_VOCAB
        self._words_by_id.setdefault(token, word)
        return token

    def word_for(self, token: int) -> str:
        return self._words_by_id.get(token, f"[{token}]")

    # ----------------------------------------------------------------- slots
    def _pick_slot(self, words: Sequence[str], id_slot: int) -> _Slot | None:
        if 0 <= id_slot < len(self.slots):
            slot = self.slots[id_slot]
            return None if slot.is_processing else slot
        idle = [s for s in self.slots if not s.is_processing]
        if not idle:
            return None
        best: _Slot | None = None
        best_sim = 0.0
        for slot in idle:
            if not slot.cache or not words:
                continue
            sim = _common_prefix(slot.cache, words) / len(words)
            if sim > best_sim and sim > SLOT_PROMPT_SIMILARITY:
                best, best_sim = slot, sim
        if best is not None:
            return best
        return min(idle, key=lambda s: s.last_used)

    async def acquire_slot(self, request: web.Request, words: Sequence[str], id_slot: int) -> _Slot:
        """Take a slot for ``words`` or wait (deferred) until one frees, like llama-server.

        Raises :class:`_Dropped` when the client leaves while waiting.
        """
        async with self._slot_freed:
            slot = self._pick_slot(words, id_slot)
            if slot is None:
                self.counters.deferred += 1
                try:
                    while slot is None:
                        if _client_gone(request) or self.closing.is_set():
                            raise _Dropped
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._slot_freed.wait(), HANG_POLL_SECONDS)
                        slot = self._pick_slot(words, id_slot)
                finally:
                    self.counters.deferred -= 1
            return slot

    async def release_slot(self, slot: _Slot) -> None:
        task = slot.task
        if task is not None:
            # the KV cache keeps all but the last generated token, as llama-server's does
            slot.cache = task.prompt_words + task.generated[:-1]
            task.has_next_token = False
            self.metrics.n_tokens_max = max(
                self.metrics.n_tokens_max, task.n_prompt + task.n_decoded
            )
        slot.last_task = task
        slot.task = None
        slot.last_used = time.monotonic()
        async with self._slot_freed:
            self._slot_freed.notify_all()

    def start_task(
        self, slot: _Slot, words: list[str], params: dict[str, Any], cache_prompt: bool
    ) -> _Task:
        n_cached = 0
        if cache_prompt and words:
            n_cached = min(_common_prefix(slot.cache, words), len(words) - 1)
        n_predict = int(params["n_predict"])
        n_target = self.options.tokens
        stop_type = "eos"
        if 0 <= n_predict <= n_target:
            n_target, stop_type = max(n_predict, 1), "limit"
        room = slot.n_ctx - len(words)
        if n_target > room:
            n_target, stop_type = max(room, 1), "limit"
        self._next_task_id += 1
        task = _Task(
            id=self._next_task_id,
            params=params,
            prompt_words=words,
            n_cached=n_cached,
            n_target=n_target,
            stop_type=stop_type,
            n_predict=n_predict,
            seed_offset=zlib.crc32(" ".join(words).encode()),
        )
        slot.task = task
        slot.cache = list(words)
        return task

    def count_prompt(self, task: _Task) -> None:
        self.metrics.prompt_tokens += task.n_prompt - task.n_cached
        self.metrics.prompt_cached += task.n_cached
        self.metrics.prompt_seconds += task.t_prompt_ms / 1e3

    def count_token(self) -> None:
        self.metrics.tokens_predicted += 1
        self.metrics.n_decode += 1

    def metrics_text(self) -> str:
        m = self.metrics
        processing = sum(1 for s in self.slots if s.is_processing)
        counters = [
            (
                "prompt_tokens_total",
                "Number of prompt tokens processed, excluding cached tokens",
                m.prompt_tokens,
            ),
            (
                "prompt_tokens_cached_total",
                "Number of prompt tokens reused from the cache",
                m.prompt_cached,
            ),
            ("prompt_seconds_total", "Total time spent processing prompts", m.prompt_seconds),
            ("tokens_predicted_total", "Number of generation tokens processed", m.tokens_predicted),
            (
                "tokens_predicted_seconds_total",
                "Total time spent generating tokens",
                m.predicted_seconds,
            ),
            ("n_decode_total", "Total number of llama_decode() calls", m.n_decode),
            (
                "n_tokens_max",
                "Largest observed sequence length (prompt + generation)",
                m.n_tokens_max,
            ),
            (
                "spec_decode_num_draft_tokens_total",
                "Speculative: Total draft tokens generated",
                0,
            ),
            (
                "spec_decode_num_accepted_tokens_total",
                "Speculative: Total draft tokens accepted by the target model",
                0,
            ),
            (
                "spec_decode_num_drafts_total",
                "Speculative: Total speculative decoding verification steps",
                0,
            ),
        ]
        gauges = [
            (
                "prompt_tokens_seconds",
                "Average prompt throughput in tokens/s",
                m.prompt_tokens / m.prompt_seconds if m.prompt_seconds else 0,
            ),
            (
                "predicted_tokens_seconds",
                "Average generation throughput in tokens/s",
                m.tokens_predicted / m.predicted_seconds if m.predicted_seconds else 0,
            ),
            ("requests_processing", "Number of requests processing", processing),
            ("requests_deferred", "Number of requests deferred", self.counters.deferred),
            (
                "n_busy_slots_per_decode",
                "Average number of busy slots per llama_decode() call",
                1 if m.n_decode else 0,
            ),
        ]
        lines: list[str] = []
        for kind, items in (("counter", counters), ("gauge", gauges)):
            for name, help_text, value in items:
                lines.append(f"# HELP llamacpp:{name} {help_text}")
                lines.append(f"# TYPE llamacpp:{name} {kind}")
                lines.append(f"llamacpp:{name} {value:g}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ responses
    def props(self) -> dict[str, Any]:
        params = dict(_DEFAULT_PARAMS)
        return {
            "default_generation_settings": {"params": params, "n_ctx": self.n_ctx},
            "total_slots": self.options.slots,
            "model_alias": self.options.model,
            "model_ftype": "all F32",
            "model_path": self.options.model,
            "modalities": {"vision": False, "video": False, "audio": False},
            "media_marker": "<__media_fake__>",
            "endpoint_slots": self.options.slots_endpoint,
            "endpoint_props": False,
            "endpoint_metrics": self.options.metrics,
            "ui": False,
            "ui_settings": {},
            "chat_template": _CHAT_TEMPLATE,
            "chat_template_caps": dict(_CHAT_TEMPLATE_CAPS),
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
            "cors_proxy_enabled": False,
        }

    def models(self) -> dict[str, Any]:
        name = self.options.model
        return {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "modified_at": "",
                    "size": "",
                    "digest": "",
                    "type": "model",
                    "description": "",
                    "tags": [""],
                    "capabilities": ["completion"],
                    "parameters": "",
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "",
                        "families": [""],
                        "parameter_size": "",
                        "quantization_level": "",
                    },
                }
            ],
            "object": "list",
            "data": [
                {
                    "id": name,
                    "aliases": [name],
                    "tags": [],
                    "object": "model",
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                    "created": int(time.time()),
                    "owned_by": "llamacpp",
                    "meta": {
                        "vocab_type": 1,
                        "n_vocab": N_VOCAB,
                        "n_ctx": self.n_ctx,
                        "n_ctx_train": max(self.options.ctx_size, 4096),
                        "n_embd": self.options.n_embd,
                        "n_params": 1000000,
                        "size": 4000000,
                        "ftype": "all F32",
                    },
                }
            ],
        }


SERVER_KEY: Final = web.AppKey("fake_llama_server", FakeLlamaServer)


# ====================================================================== helpers
def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=_dumps(obj), status=status, content_type="application/json", charset="utf-8"
    )


def _words(text: str) -> list[str]:
    """The token-counting rule: whitespace-separated words."""
    return re.findall(r"\S+", text)


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _value(body: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
    """llama-server's json_value(): a missing, null or wrongly typed value gives the default."""
    value = body.get(key)
    if value is None or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        return default
    return value if isinstance(value, kind) else default


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _metrics_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in _FULL_ONLY_PARAMS}


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ApiError(400, "invalid_request_error", f"parse error: {exc}") from exc
    if not isinstance(body, dict):
        raise _ApiError(400, "invalid_request_error", "request body must be a JSON object")
    return body


def _render_chat(body: dict[str, Any]) -> str:
    """Render chat messages with the ChatML template the fake claims in /props."""
    if "messages" not in body:
        raise _ApiError(400, "invalid_request_error", "'messages' is required")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _ApiError(400, "invalid_request_error", "Expected 'messages' to be an array")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise _ApiError(400, "invalid_request_error", "each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise _ApiError(400, "invalid_request_error", "each message needs a string 'role'")
        content = message.get("content")
        if content is None and role != "assistant":
            raise _ApiError(
                400, "invalid_request_error", "All non-assistant messages must contain 'content'"
            )
        if isinstance(content, list):
            texts = [
                p["text"]
                for p in content
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            ]
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _ApiError(
                400, "invalid_request_error", "'content' must be a string or an array of parts"
            )
        parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _task_params(body: dict[str, Any], *, chat: bool, stream: bool) -> dict[str, Any]:
    """The task's full parameter set: defaults overlaid with the request's fields."""
    params: dict[str, Any] = dict(_DEFAULT_PARAMS)
    params.update(copy.deepcopy(_FULL_ONLY_PARAMS))
    params["reasoning_format"] = "deepseek"
    if chat:
        params["chat_format"] = "peg-native"
        params["generation_prompt"] = "<|im_start|>assistant\n"
    for key in _FLOAT_PARAMS:
        value = _value(body, key, None, (int, float))
        if value is not None:
            params[key] = float(value)
    for key in _INT_PARAMS:
        value = _value(body, key, None, int)
        if value is not None:
            params[key] = value
    for key in _BOOL_PARAMS:
        params[key] = _value(body, key, params[key], bool)
    n_predict = _value(body, "n_predict", -1, int)
    n_predict = _value(body, "max_tokens", n_predict, int)
    n_predict = _value(body, "max_completion_tokens", n_predict, int)
    params["n_predict"] = params["max_tokens"] = n_predict
    params["stream"] = stream
    stop = body.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif isinstance(stop, list):
        params["stop"] = [s for s in stop if isinstance(s, str)]
    return params


def _embedding(text: str, n_embd: int) -> list[float]:
    """A deterministic unit vector for ``text``: the same text always gets the same one."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(n_embd)]
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    return [x / norm for x in vec]


# ====================================================================== routes
class _Routes:
    """HTTP handlers; all state lives in :class:`FakeLlamaServer`."""

    def __init__(self, server: FakeLlamaServer) -> None:
        self.server = server

    # ------------------------------------------------------------ plumbing
    def error_if_faulty(self) -> Fault:
        fault = self.server.take_fault(_REQUEST_FAULTS)
        if fault is Fault.HTTP_500:
            raise _ApiError(500, "server_error", "fake fault: http-500")
        return fault

    def exit_now(self, request: web.Request) -> NoReturn:
        """The ``exit-mid-stream`` fault: die like a crashed llama-server."""
        if self.server.options.own_process:
            log.warning("fault exit-mid-stream: exiting instance=%s", self.server.instance_name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)
        if request.transport is not None:
            request.transport.abort()
        raise _Dropped

    # ------------------------------------------------------------ simple GETs
    async def health(self, request: web.Request) -> web.Response:
        return _json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        return _json_response(self.server.props())

    async def index(self, request: web.Request) -> web.StreamResponse:
        assert self.server.options.static_path is not None
        page = Path(self.server.options.static_path) / "index.html"
        if not page.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(page)

    async def post_props(self, request: web.Request) -> web.Response:
        raise _ApiError(
            501,
            "not_supported_error",
            "This server does not support changing global properties. Start it with `--props`",
        )

    async def slots(self, request: web.Request) -> web.Response:
        if not self.server.options.slots_endpoint:
            raise _ApiError(
                501,
                "not_supported_error",
                "This server does not support slots endpoint. Start it with `--slots`",
            )
        if request.query.get("fail_on_no_slot") and all(s.is_processing for s in self.server.slots):
            raise _ApiError(503, "unavailable_error", "no slot available")
        return _json_response([s.to_json() for s in self.server.slots])

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.server.options.metrics:
            raise _ApiError(
                501,
                "not_supported_error",
                "This server does not support metrics endpoint. Start it with `--metrics`",
            )
        return web.Response(
            body=self.server.metrics_text().encode(),
            headers={
                "Process-Start-Time-Unix": str(self.server.t_start_unix),
                "Content-Type": "text/plain; version=0.0.4",
            },
        )

    async def models(self, request: web.Request) -> web.Response:
        return _json_response(self.server.models())

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        content = body.get("content")
        tokens: list[Any] = []
        if isinstance(content, str):
            words = _words(content)
            ids = [self.server.token_id(w) for w in words]
            if _value(body, "with_pieces", False, bool):
                tokens = [{"id": i, "piece": w} for i, w in zip(ids, words, strict=True)]
            else:
                tokens = ids
        elif content is not None:
            raise _ApiError(400, "invalid_request_error", "'content' must be a string")
        return _json_response({"tokens": tokens})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise _ApiError(400, "invalid_request_error", "'tokens' must be a list of integers")
        content = " ".join(self.server.word_for(t) for t in tokens)
        return _json_response({"content": content})

    # -------------------------------------------------------------- _fake
    async def fake_state(self, request: web.Request) -> web.Response:
        return _json_response(self.server.state())

    async def fake_fault(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        try:
            fault = Fault(str(body.get("fault")))
        except ValueError as exc:
            kinds = ", ".join(f.value for f in Fault)
            raise _ApiError(
                400, "invalid_request_error", f"'fault' must be one of {kinds}"
            ) from exc
        count = body.get("count")
        if count is not None and (
            not isinstance(count, int) or isinstance(count, bool) or count < 1
        ):
            raise _ApiError(400, "invalid_request_error", "'count' must be a positive integer")
        await self.server.set_fault(fault, count)
        response = _json_response({"fault": str(fault), "count": count})
        if fault is Fault.REFUSE:
            response.force_close()
        return response

    # ---------------------------------------------------------- embeddings
    async def embeddings_oai(self, request: web.Request) -> web.Response:
        return await self._embeddings(request, oai=True)

    async def embeddings_native(self, request: web.Request) -> web.Response:
        return await self._embeddings(request, oai=False)

    async def _embeddings(self, request: web.Request, *, oai: bool) -> web.Response:
        server = self.server
        if not server.options.embeddings:
            raise _ApiError(
                501,
                "not_supported_error",
                "This server does not support embeddings. Start it with `--embeddings`",
            )
        body = await _read_json(request)
        self.server.counters.last_model = body.get("model")
        if "input" in body:
            prompt = body["input"]
        elif "content" in body:
            oai = False  # "content" is llama.cpp's own field, answered in its own shape
            prompt = body["content"]
        else:
            raise _ApiError(400, "invalid_request_error", '"input" or "content" must be provided')
        use_base64 = False
        if "encoding_format" in body:
            if body["encoding_format"] == "base64":
                use_base64 = True
            elif body["encoding_format"] != "float":
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    "The format to return the embeddings in. Can be either float or base64",
                )
        texts = self._embedding_texts(prompt)
        self._begin()
        ok = False
        try:
            fault = self.error_if_faulty()
            if fault is Fault.HANG:
                await self.server.hang(request)
            results = []
            for text in texts:
                vector = _embedding(text, server.options.n_embd)
                results.append((vector, max(len(_words(text)), 1)))
            ok = True
        finally:
            self._end(ok)
        if not oai:
            return _json_response(
                [{"index": i, "embedding": [vec]} for i, (vec, _) in enumerate(results)]
            )
        data: list[dict[str, Any]] = []
        for i, (vec, _) in enumerate(results):
            if use_base64:
                packed = struct.pack(f"<{len(vec)}f", *vec)
                data.append(
                    {
                        "embedding": base64.b64encode(packed).decode(),
                        "index": i,
                        "object": "embedding",
                        "encoding_format": "base64",
                    }
                )
            else:
                data.append({"embedding": vec, "index": i, "object": "embedding"})
        n_tokens = sum(n for _, n in results)
        return _json_response(
            {
                "model": server.options.model,  # as llama-server: its own, not the client's
                "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": data,
            }
        )

    def _embedding_texts(self, prompt: Any) -> list[str]:
        def one(p: Any) -> str:
            if isinstance(p, str):
                return p
            if isinstance(p, list) and all(isinstance(t, int) for t in p):
                return " ".join(self.server.word_for(t) for t in p)
            raise _ApiError(
                400, "invalid_request_error", '"input" must be a string or a list of tokens'
            )

        if isinstance(prompt, list) and (not prompt or not all(isinstance(t, int) for t in prompt)):
            texts = [one(p) for p in prompt]
        else:
            texts = [one(prompt)]
        if not texts:
            raise _ApiError(400, "invalid_request_error", '"input" must not be empty')
        return texts

    # ---------------------------------------------------------- completions
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def completions_oai(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "oai")

    async def completion_native(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "native")

    def _begin(self) -> None:
        c = self.server.counters
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)

    def _end(self, ok: bool) -> None:
        c = self.server.counters
        c.in_flight -= 1
        if ok:
            c.requests_served += 1
        else:
            c.requests_failed += 1

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        server = self.server
        body = await _read_json(request)
        server.counters.last_model = body.get("model")
        if kind == "chat":
            prompt_text = _render_chat(body)
        else:
            if "prompt" not in body:
                raise _ApiError(400, "invalid_request_error", "key 'prompt' not found")
            prompt = body["prompt"]
            if isinstance(prompt, str):
                prompt_text = prompt
            elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                prompt_text = " ".join(server.word_for(t) for t in prompt)
            else:
                raise _ApiError(
                    400,
                    "invalid_request_error",
                    '"prompt" must be a string or a list of tokens (the fake serves one prompt '
                    "per request)",
                )
        stream = _value(body, "stream", False, bool)
        params = _task_params(body, chat=kind == "chat", stream=stream)
        words = _words(prompt_text)
        if len(words) >= server.n_ctx:
            raise _ApiError(
                400,
                "exceed_context_size_error",
                f"request ({len(words)} tokens) exceeds the available context size "
                f"({server.n_ctx} tokens), try increasing it",
                {"n_prompt_tokens": len(words), "n_ctx": server.n_ctx},
            )
        id_slot = _value(body, "id_slot", -1, int)
        cache_prompt = _value(body, "cache_prompt", True, bool)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        self._begin()
        ok = False
        try:
            fault = self.error_if_faulty()
            if fault is Fault.HANG:
                await self.server.hang(request)
            slot = await server.acquire_slot(request, words, id_slot)
            try:
                task = server.start_task(slot, words, params, cache_prompt)
                log.debug("task=%d slot=%d cache_n=%d", task.id, slot.id, task.n_cached)
                ctx = _Completion(self, request, kind, task, slot, prompt_text, fault)
                if stream:
                    response = await ctx.stream(include_usage)
                else:
                    response = await ctx.whole()
                ok = True
                return response
            finally:
                await server.release_slot(slot)
        finally:
            self._end(ok)


class _Completion:
    """One completion request from slot taken to last byte, in llama-server's shapes."""

    def __init__(
        self,
        routes: _Routes,
        request: web.Request,
        kind: str,
        task: _Task,
        slot: _Slot,
        prompt_text: str,
        fault: Fault,
    ) -> None:
        self.routes = routes
        self.server = routes.server
        self.request = request
        self.kind = kind
        self.task = task
        self.slot = slot
        self.prompt_text = prompt_text
        self.fault = fault
        self.cmpl_id = "chatcmpl-" + hashlib.sha256(os.urandom(16)).hexdigest()[:32]
        self.created = int(time.time())

    async def tokens(self) -> AsyncIterator[tuple[str, int]]:
        """Yield generated tokens, one per token delay; stops if the client leaves."""
        task = self.task
        task.t_prompt_ms = (time.perf_counter() - task.t_start) * 1e3
        self.server.count_prompt(task)
        task.t_gen_start = time.perf_counter()
        delay = self.server.options.token_delay
        for i in range(task.n_target):
            if self.fault is Fault.EXIT_MID_STREAM and i == EXIT_AFTER_TOKENS:
                self.routes.exit_now(self.request)
            await asyncio.sleep(delay)
            if _client_gone(self.request):
                raise _Dropped
            word = _WORDS[(task.seed_offset + i) % len(_WORDS)]
            task.generated.append(word)
            task.t_gen_ms = (time.perf_counter() - task.t_gen_start) * 1e3
            self.server.count_token()
            yield " " + word, self.server.token_id(word)
        task.has_next_token = False
        self.server.metrics.predicted_seconds += task.t_gen_ms / 1e3
        if self.fault is Fault.EXIT_MID_STREAM:
            self.routes.exit_now(self.request)

    def finish_reason(self) -> str:
        return "length" if self.task.stop_type == "limit" else "stop"

    # ------------------------------------------------------------ whole
    async def whole(self) -> web.Response:
        text_parts: list[str] = []
        async for piece, _ in self.tokens():
            text_parts.append(piece)
        content = "".join(text_parts)
        task = self.task
        if self.kind == "native":
            return _json_response(self.native_final(content))
        if self.kind == "oai":
            body: dict[str, Any] = {
                "choices": [
                    {
                        "text": content,
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": self.finish_reason(),
                    }
                ],
                "created": self.created,
                "model": self.server.options.model,
                "system_fingerprint": BUILD_INFO,
                "object": "text_completion",
                "usage": task.usage(),
                "id": self.cmpl_id,
                "timings": task.timings(),
            }
            return _json_response(body)
        body = {
            "choices": [
                {
                    "finish_reason": self.finish_reason(),
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "created": self.created,
            "model": self.server.options.model,
            "system_fingerprint": BUILD_INFO,
            "object": "chat.completion",
            "usage": task.usage(),
            "id": self.cmpl_id,
            "timings": task.timings(),
        }
        return _json_response(body)

    def native_final(self, content: str) -> dict[str, Any]:
        task = self.task
        return {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": self.slot.id,
            "stop": True,
            "model": self.server.options.model,
            "tokens_predicted": task.n_decoded,
            "tokens_evaluated": task.n_prompt,
            "generation_settings": dict(task.params),
            "prompt": self.prompt_text,
            "has_new_line": "\n" in content,
            "truncated": False,
            "stop_type": task.stop_type,
            "stopping_word": "",
            "tokens_cached": task.n_prompt + task.n_decoded - 1,
            "timings": task.timings(),
        }

    # ----------------------------------------------------------- stream
    async def stream(self, include_usage: bool) -> web.StreamResponse:
        request = self.request
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "X-Accel-Buffering": "no",
                "Keep-Alive": KEEP_ALIVE_HEADER,
            },
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await self._send_stream(response, include_usage)
            await response.write_eof()
        except ConnectionError as exc:
            raise _Dropped from exc
        if self.server.options.close_after_stream and request.transport is not None:
            # llama-server closes the connection after a stream despite its Keep-Alive
            # header; a pooled client must cope, so the fake sets the same trap.
            request.transport.close()
        return response

    async def _send_stream(self, response: web.StreamResponse, include_usage: bool) -> None:
        task = self.task
        per_token_timings = bool(task.params.get("timings_per_token"))

        async def send(*events: dict[str, Any]) -> None:
            data = "".join(f"data: {_dumps(e)}\n\n" for e in events)
            await response.write(data.encode())

        n = 0
        async for piece, token in self.tokens():
            n += 1
            if self.kind == "native":
                event: dict[str, Any] = {
                    "index": 0,
                    "content": piece,
                    "tokens": [token],
                    "stop": False,
                    "id_slot": -1,
                    "tokens_predicted": task.n_decoded,
                    "tokens_evaluated": task.n_prompt,
                }
                if per_token_timings:
                    event["timings"] = task.timings()
                await send(event)
            elif self.kind == "oai":
                event = self._oai_chunk(piece, None)
                if per_token_timings:
                    event["timings"] = task.timings()
                await send(event)
            else:
                events = []
                if n == 1:
                    events.append(self._chat_chunk({"role": "assistant", "content": None}, None))
                events.append(self._chat_chunk({"content": piece}, None))
                if per_token_timings:
                    events[-1]["timings"] = task.timings()
                await send(*events)

        if self.kind == "native":
            final = self.native_final("")
            await send(final)
            return
        if self.kind == "oai":
            final = self._oai_chunk("", self.finish_reason())
            final["usage"] = task.usage()
            final["timings"] = task.timings()
            await send(final)
        else:
            finals = [self._chat_chunk({}, self.finish_reason())]
            if include_usage:
                usage_chunk = self._chat_chunk({}, None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = task.usage()
                finals.append(usage_chunk)
            finals[-1]["timings"] = task.timings()
            await send(*finals)
        await response.write(b"data: [DONE]\n\n")

    def _chat_chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "choices": [{"finish_reason": finish_reason, "index": 0, "delta": delta}],
            "created": self.created,
            "id": self.cmpl_id,
            "model": self.server.options.model,
            "system_fingerprint": BUILD_INFO,
            "object": "chat.completion.chunk",
        }

    def _oai_chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {
            "choices": [
                {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
            "created": self.created,
            "model": self.server.options.model,
            "system_fingerprint": BUILD_INFO,
            "object": "text_completion",
            "id": self.cmpl_id,
        }


# ================================================================= application
_PUBLIC_PATHS: Final = frozenset({"/health", "/v1/health"})


def _api_key_ok(request: web.Request, keys: Sequence[str]) -> bool:
    given = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
    given = given.removeprefix("Bearer ")
    # compare against every key, in constant time, so timing reveals nothing
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def _middleware(server: FakeLlamaServer) -> Any:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if request.path.startswith("/_fake/"):
                return await handler(request)
            server.counters.requests_total += 1
            server.request_headers.append(dict(request.headers))
            server.note_connection(request)
            if request.method == "OPTIONS":  # a preflight, on any path, before the key
                return web.Response(status=200, content_type="text/html")
            if request.headers.get("Content-Encoding", "identity").lower() != "identity":
                # llama-server (cpp-httplib, built without zlib) decodes no request body
                return web.Response(status=415)  # as llama-server: no body
            if server.refusing:
                if request.transport is not None:
                    request.transport.abort()
                raise _Dropped
            if server.take_fault(frozenset({Fault.HANG_ALL})) is Fault.HANG_ALL:
                await server.hang(request)
            # order as llama-server: loading first, then the key (so /health is public)
            if not server.ready:
                raise _ApiError(503, "unavailable_error", "Loading model")
            if (
                server.options.api_keys
                and request.path not in _PUBLIC_PATHS
                and not _api_key_ok(request, server.options.api_keys)
            ):
                log.warning("unauthorized: Invalid API Key path=%s", request.path)
                raise _ApiError(401, "authentication_error", "Invalid API Key")
            return await handler(request)
        except _ApiError as exc:
            return exc.response()
        except _Dropped:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)
        except web.HTTPNotFound:
            return _ApiError(404, "not_found_error", "File Not Found").response()
        except web.HTTPMethodNotAllowed:
            return _ApiError(405, "invalid_request_error", "Method Not Allowed").response()

    return middleware


def build_app(options: FakeOptions) -> web.Application:
    """Build the fake's application; its state is ``app[SERVER_KEY]``.

    The load delay counts from the application's startup.
    """
    server = FakeLlamaServer(options)
    app = web.Application(middlewares=[_middleware(server)], client_max_size=64 * 1024**2)
    app[SERVER_KEY] = server
    routes = _Routes(server)

    async def on_startup(_: web.Application) -> None:
        server.started_at = time.monotonic()

    async def on_shutdown(_: web.Application) -> None:
        server.closing.set()

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if server.instance_name is None:
            # in-process the port is known only from a connection: name the fake by it
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            server.instance_name = str(sockname[1]) if sockname else "fake"
        response.headers["X-Fake-Instance"] = server.instance_name
        response.headers["Server"] = "llama.cpp"
        origin = request.headers.get("Origin")
        if origin:  # llama-server's default CORS (--cors-origins *): any origin, reflected
            response.headers["Access-Control-Allow-Origin"] = origin
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Credentials"] = "true"
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "*"
        if response.keep_alive:
            response.headers.setdefault("Keep-Alive", KEEP_ALIVE_HEADER)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(on_prepare)
    r = app.router
    for path in ("/health", "/v1/health"):
        r.add_get(path, routes.health)
    r.add_get("/props", routes.props)
    if options.static_path is not None:
        r.add_get("/", routes.index)
    r.add_post("/props", routes.post_props)
    r.add_get("/slots", routes.slots)
    r.add_get("/metrics", routes.metrics)
    for path in ("/models", "/v1/models"):
        r.add_get(path, routes.models)
    for path in ("/completion", "/completions"):
        r.add_post(path, routes.completion_native)
    r.add_post("/v1/completions", routes.completions_oai)
    for path in ("/chat/completions", "/v1/chat/completions"):
        r.add_post(path, routes.chat_completions)
    for path in ("/embedding", "/embeddings"):
        r.add_post(path, routes.embeddings_native)
    r.add_post("/v1/embeddings", routes.embeddings_oai)
    r.add_post("/tokenize", routes.tokenize)
    r.add_post("/detokenize", routes.detokenize)
    r.add_get("/_fake/state", routes.fake_state)
    r.add_post("/_fake/fault", routes.fake_fault)
    return app


# ===================================================================== process
def _parse_args(argv: Sequence[str] | None) -> tuple[FakeOptions, str, int]:
    p = argparse.ArgumentParser(
        prog="python -m corral.testing.fake_llama_server",
        description="A fake llama-server for tests: real HTTP, llama-server's shapes, "
        "settable slots, delays and faults.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    p.add_argument("--name", default=None, help="X-Fake-Instance value (default: the port)")
    p.add_argument(
        "--model", "-m", default="fake-model", help="model name (a .gguf path: its file stem)"
    )
    p.add_argument("--alias", "-a", default=None, help="model name, as llama-server's alias")
    p.add_argument("--slots", "-np", "--parallel", type=int, default=1)
    p.add_argument("--ctx-size", "-c", type=int, default=4096, help="split across slots")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds of 503 at start")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    p.add_argument("--tokens", type=int, default=8, help="tokens per completion")
    p.add_argument("--n-embd", type=int, default=64, help="embedding length")
    p.add_argument("--fault", type=Fault, choices=list(Fault), default=Fault.NONE)
    p.add_argument("--fault-count", type=int, default=None)
    p.add_argument("--api-key", default="", help="comma-separated keys")
    p.add_argument("--no-metrics", action="store_true", help="/metrics answers 501")
    p.add_argument("--no-slots", action="store_true", help="/slots answers 501")
    p.add_argument("--no-embeddings", action="store_true", help="embeddings answer 501")
    p.add_argument(
        "--keep-alive-after-stream",
        action="store_true",
        help="keep connections open after a stream (llama-server closes them)",
    )
    p.add_argument(
        "--path",
        default=os.environ.get("LLAMA_ARG_STATIC_PATH") or None,
        help="serve DIR/index.html at / (llama-server's static files; env LLAMA_ARG_STATIC_PATH)",
    )
    p.add_argument(
        "--kv-limit",
        type=int,
        default=None,
        help="fault: exit at start, as llama-server does when its KV cache cannot be "
        "allocated, if --ctx-size is larger than this",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--list-devices",
        action="store_true",
        help="print the devices, as llama-server does, and exit: CORRAL_FAKE_DEVICES lists "
        "them as NAME|DESCRIPTION|TOTAL_MIB|FREE_MIB;... (unset: none)",
    )
    p.add_argument(
        "-dev",
        "--device",
        default=None,
        help="devices to offload to, as llama-server takes them: each must be one of "
        "CORRAL_FAKE_DEVICES (or none)",
    )
    p.add_argument(
        "--oom-on",
        default=None,
        metavar="DEVICE",
        help="fault: exit at start as llama-server does when a buffer cannot be allocated "
        "on DEVICE, if DEVICE is one of --device (or --device is absent)",
    )
    p.add_argument("--ssl-cert-file", default=None, help="serve https (with --ssl-key-file)")
    p.add_argument("--ssl-key-file", default=None)
    # real llama-server flags the fake has no use for (sampling, cache ...) are accepted
    # and ignored, so corral can pass what it passes to the real one
    a, ignored = p.parse_known_args(argv)
    if a.list_devices:
        _print_devices(os.environ.get("CORRAL_FAKE_DEVICES", ""))
        raise SystemExit(0)
    if any(not arg.startswith("-") and i == 0 for i, arg in enumerate(ignored)):
        p.error(f"unexpected argument {ignored[0]!r}")
    if a.slots < 1 or a.tokens < 1 or a.ctx_size < 1 or a.n_embd < 1:
        p.error("--slots, --tokens, --ctx-size and --n-embd must be >= 1")
    if a.load_delay < 0 or a.token_delay < 0:
        p.error("delays must be >= 0")
    listed = [e.split("|")[0] for e in os.environ.get("CORRAL_FAKE_DEVICES", "").split(";") if e]
    chosen = [d for d in (a.device or "").split(",") if d and d != "none"]
    for device in chosen:
        if device not in listed:
            print(f"error: invalid device: {device}", file=sys.stderr)
            raise SystemExit(1)
    if a.oom_on is not None and (a.oom_on in chosen or a.device is None):
        index = listed.index(a.oom_on) if a.oom_on in listed else 0
        print(
            f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1024.00 MiB on device "
            f"{index}: cudaMalloc failed: out of memory\n"
            f"alloc_tensor_range: failed to allocate {a.oom_on} buffer of size 1073741824\n"
            f"llama_model_load: error loading model: unable to allocate {a.oom_on} buffer\n"
            "llama_model_load_from_file_impl: failed to load model",
            file=sys.stderr,
        )
        raise SystemExit(1)
    if a.kv_limit is not None and a.ctx_size > a.kv_limit:
        print(
            f"llama_kv_cache: failed to allocate buffer for {a.ctx_size} cells\n"
            "common_init_from_params: failed to create context\n"
            "srv load_model: failed to load model",
            file=sys.stderr,
        )
        raise SystemExit(1)
    logging.basicConfig(
        level=a.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    model = a.alias or (Path(a.model).stem if a.model.endswith(".gguf") else a.model)
    options = FakeOptions(
        model=model,
        name=a.name,
        slots=a.slots,
        ctx_size=a.ctx_size,
        load_delay=a.load_delay,
        token_delay=a.token_delay,
        tokens=a.tokens,
        fault=a.fault,
        fault_count=a.fault_count,
        api_keys=tuple(k for k in a.api_key.split(",") if k),
        n_embd=a.n_embd,
        metrics=not a.no_metrics,
        slots_endpoint=not a.no_slots,
        embeddings=not a.no_embeddings,
        close_after_stream=not a.keep_alive_after_stream,
        static_path=a.path,
        own_process=True,
        ssl_files=(a.ssl_cert_file, a.ssl_key_file) if a.ssl_cert_file and a.ssl_key_file else None,
    )
    return options, a.host, a.port


def _print_devices(listing: str) -> None:
    """``--list-devices`` as llama-server prints it (common/arg.cpp)."""
    print("Available devices:")
    devices = [entry.split("|") for entry in listing.split(";") if entry.strip()]
    if not devices:
        print("  (none)")
    for name, description, total, free in devices:
        print(f"  {name}: {description} ({total} MiB, {free} MiB free)")


async def _serve(options: FakeOptions, host: str, port: int) -> None:
    app = build_app(options)
    server = app[SERVER_KEY]
    # one line per request, like llama-server's "log_server_r: request: ..." lines
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("fake.access"),
        access_log_format="request: %r %a %s",
        shutdown_timeout=1.0,
    )
    await runner.setup()
    context = None
    if options.ssl_files is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*options.ssl_files)
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    bound_port = int(runner.addresses[0][1])
    server.instance_name = options.name or str(bound_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def graceful_sigterm(ignore: bool) -> None:
        if ignore:
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log.info("ignoring SIGTERM")
        else:
            loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def refuse() -> None:
        log.info("refusing connections: closing the listening socket")
        await site.stop()

    loop.add_signal_handler(signal.SIGINT, stop.set)
    graceful_sigterm(options.fault is Fault.IGNORE_SIGTERM)
    server.hooks = _ProcessHooks(refuse=refuse, set_ignore_sigterm=graceful_sigterm)
    # the one line a test reads to learn the port: stdout, flushed, nothing else there
    scheme = "https" if context is not None else "http"
    sys.stdout.write(f"listening on {scheme}://{host}:{bound_port}\n")
    sys.stdout.flush()
    log.info(
        "listening host=%s port=%d slots=%d model=%s fault=%s",
        host,
        bound_port,
        options.slots,
        options.model,
        options.fault,
    )
    if options.fault is Fault.REFUSE:
        await server.set_fault(Fault.REFUSE, None)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m corral.testing.fake_llama_server``."""
    options, host, port = _parse_args(argv)
    try:
        asyncio.run(_serve(options, host, port))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
