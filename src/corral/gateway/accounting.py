"""Accounting: what a finished response counts, logs and teaches.

Every answer the front door gives, its own refusals and relayed responses alike, is
counted once here (:meth:`Accounting.record`: the request metrics, the dashboard's
recent traffic, one logfmt access-log line); a relayed response's token usage is read
off its end as it passes (:class:`ResponseTail`) and learned from
(:meth:`Accounting.learn`: token counters, and the cache feedback its lease carries to
the placement policy).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from corral.gateway.exchange import Exchange
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.scheduling.policies import Served
from corral.scheduling.scheduler import Lease

access_log = logging.getLogger("corral.access")

#: The status recorded for a response its client did not stay for (nginx's 499).
CLIENT_GONE = 499
#: Set on a request once its response is counted, so a cancellation counts it once.
RECORDED: web.RequestKey[bool] = web.RequestKey("corral_recorded", bool)


@dataclass(frozen=True)
class TokenUsage:
    """What a response reports about its tokens; None where it says nothing.

    ``cached`` and ``prompt`` come together or not at all (``timings.cache_n`` /
    ``usage.prompt_tokens_details.cached_tokens`` and ``usage.prompt_tokens`` or
    ``timings.prompt_n + cache_n``); ``generated`` is ``usage.completion_tokens``, else
    llama.cpp's ``timings.predicted_n``.
    """

    cached: int | None = None
    prompt: int | None = None
    prompt_seconds: float | None = None
    generated: int | None = None


class ResponseTail:
    """What a relayed response says about its tokens, kept while it passes: for a
    stream, the last SSE event carrying ``timings``/``usage`` (and the unfinished event
    at the end of what arrived so far); for a plain response, its body up to
    :data:`LIMIT` bytes.

    A stream keeps one event, not its whole text: with 1,000 streams open, keeping
    each one's output would cost tens of MB.
    """

    LIMIT = 64 * 1024

    __slots__ = ("data", "event", "is_sse", "overflow")

    def __init__(self, is_sse: bool) -> None:
        self.is_sse = is_sse
        self.data = bytearray()
        """plain: the body so far; SSE: the event still arriving (unterminated)"""
        self.overflow = False
        self.event: bytes | None = None
        """SSE: the last complete event that mentions ``timings`` or ``usage``"""

    def add(self, chunk: bytes) -> None:
        if not self.is_sse:
            if not self.overflow:
                self.data += chunk
                if len(self.data) > self.LIMIT:
                    self.overflow = True  # a body this big is not a small JSON answer
                    self.data.clear()
            return
        if self.data:
            self.data += chunk
            chunk = bytes(self.data)
            self.data.clear()
        end = chunk.rfind(b"\n\n")
        if end < 0:
            self._pending(chunk)
            return
        complete, rest = chunk[:end], chunk[end + 2 :]
        if b'"timings"' in complete or b'"usage"' in complete:
            for event in reversed(complete.split(b"\n\n")):
                if b'"timings"' in event or b'"usage"' in event:
                    self.event = event
                    break
        if rest:
            self._pending(rest)

    def _pending(self, part: bytes) -> None:
        """Keep the unfinished event; one larger than :data:`LIMIT` is not a usage
        report anyone needs, so its start is dropped (it can't parse as one)."""
        self.data += part
        if len(self.data) > self.LIMIT:
            del self.data[: len(self.data) - self.LIMIT]

    def _final_payload(self) -> dict[str, Any] | None:
        """The last SSE event carrying ``timings``/``usage``, or the JSON body."""
        if self.overflow:
            return None
        payload: Any = None
        if self.is_sse:
            event = self.event
            if self.data.strip():  # a last event with no blank line after it
                last = bytes(self.data)
                if b'"timings"' in last or b'"usage"' in last:
                    event = last
            if event is None:
                return None
            line = event.strip()
            if not line.startswith(b"data: {"):
                return None
            try:
                payload = json.loads(line[6:])
            except ValueError:
                return None
        else:
            try:
                payload = json.loads(bytes(self.data))
            except ValueError:
                return None
        return payload if isinstance(payload, dict) else None

    def usage(self) -> TokenUsage:
        """Prompt, cached and generated tokens as far as the response reports them."""
        payload = self._final_payload()
        if payload is None:
            return TokenUsage()
        raw_timings, raw_usage = payload.get("timings"), payload.get("usage")
        timings: dict[str, Any] = raw_timings if isinstance(raw_timings, dict) else {}
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        cached = timings.get("cache_n")
        prompt_n = timings.get("prompt_n")
        prompt = usage.get("prompt_tokens")
        if cached is None:
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if prompt is None and isinstance(prompt_n, int) and isinstance(cached, int):
            prompt = prompt_n + cached
        generated = usage.get("completion_tokens")
        if not isinstance(generated, int):
            generated = timings.get("predicted_n")
        prompt_ms = timings.get("prompt_ms")
        known = isinstance(cached, int) and isinstance(prompt, int)
        seconds = prompt_ms / 1000 if isinstance(prompt_ms, int | float) else None
        return TokenUsage(
            cached=cached if known else None,
            prompt=prompt if known else None,
            prompt_seconds=seconds if known else None,
            generated=generated if isinstance(generated, int) else None,
        )

    def prompt_usage(self) -> tuple[int, int, float | None] | None:
        """(cached prompt tokens, prompt tokens, prompt seconds), when reported."""
        usage = self.usage()
        if usage.cached is None or usage.prompt is None:
            return None
        return usage.cached, usage.prompt, usage.prompt_seconds


#: what makes a logfmt value need quoting: nothing, or anything beyond printable ASCII
#: other than a space, quote, ``=`` or backslash
_PLAIN_VALUE = re.compile(r"[!#-<>-\[\]-~]+")


def logfmt(fields: list[tuple[str, object]]) -> str:
    """``key=value`` pairs; a value that is empty or holds spaces, quotes, ``=``,
    backslashes or anything but printable ASCII is JSON-quoted, so a hostile model name
    cannot forge fields or lines. None is written ``-``."""
    parts = []
    for key, value in fields:
        text = "-" if value is None else str(value)
        if _PLAIN_VALUE.fullmatch(text) is None:
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class Accounting:
    """Counts and logs finished responses; see the module doc."""

    def __init__(self, metrics: BalancerMetrics, *, learns: bool = True) -> None:
        self.metrics = metrics
        self.learns = learns
        """The placement policy learns from responses (:attr:`Policy.learns`)."""
        self.traffic: RecentTraffic | None = None
        """Recent traffic per model for the dashboard, when the balancer keeps it."""

    def finish(self, response: web.StreamResponse, ex: Exchange) -> web.StreamResponse:
        """Answer with corral's own response (an error, a preflight): no upstream byte."""
        response.headers["X-Request-Id"] = ex.request_id
        self.record(ex, response.status)
        return response

    def record(
        self,
        ex: Exchange,
        status: int,
        ttft: float | None = None,
        usage: TokenUsage | None = None,
    ) -> None:
        """Count one finished response and write its access-log line.

        ``ttft`` is set for responses relayed from an instance (corral's own answers
        have no first token), so the TTFT histogram shares the response's labels."""
        model, route = ex.model, ex.route
        elapsed = time.monotonic() - ex.started
        code = str(status)
        self.metrics.requests.labels(model, route, code).inc()
        self.metrics.duration.labels(model, route, code).observe(elapsed)
        if ttft is not None:
            self.metrics.ttft.labels(model, route, code).observe(ttft)
        usage = usage or TokenUsage()
        ex.trace.finish(
            model=model,
            status=status,
            instance=ex.instance,
            input_tokens=usage.prompt,
            output_tokens=usage.generated,
            cached_tokens=usage.cached,
        )
        if self.traffic is not None:
            self.traffic.record(model, status, elapsed, ttft)
        if access_log.isEnabledFor(logging.INFO):
            fields: list[tuple[str, object]] = [
                ("request_id", ex.request_id),
                ("model", model or "-"),
                *((("asked", ex.asked),) if ex.asked else ()),
                ("route", route),
                ("instance", ex.instance or "-"),
                ("status", status),
                ("buffer_wait", f"{ex.waited:.4f}"),
                ("ttft", f"{ttft:.4f}" if ttft is not None else "-"),
                ("duration", f"{elapsed:.4f}"),
                ("prompt_tokens", usage.prompt),
                ("cached_tokens", usage.cached),
                ("generated_tokens", usage.generated),
            ]
            access_log.info("%s", logfmt(fields))

    def learn(self, usage: TokenUsage, lease: Lease, ex: Exchange) -> None:
        """Count prompt (cached and uncached) and generated tokens, and hand what the
        server really reused (``timings.cache_n`` / ``usage``) to the lease, whose
        release tells the policy (:class:`~corral.scheduling.policies.base.Served`)."""
        instance = lease.instance
        if usage.generated is not None:
            self.metrics.generated_tokens.labels(instance.model, instance.id).inc(usage.generated)
        if usage.cached is None or usage.prompt is None:
            return
        cached, prompt = usage.cached, usage.prompt
        self.metrics.prompt_tokens.labels(instance.model, instance.id, "cached").inc(cached)
        self.metrics.prompt_tokens.labels(instance.model, instance.id, "uncached").inc(
            max(0, prompt - cached)
        )
        if self.learns and ex.placement is not None:
            lease.served = Served(
                ex.placement,
                cached,
                prompt,
                prompt_seconds=usage.prompt_seconds,
                total_seconds=time.monotonic() - ex.started,
            )
