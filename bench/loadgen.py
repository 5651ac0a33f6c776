"""corral's own load generator: closed and open loops over aiohttp.

Why our own: we need per-request TTFT, token and cached-token counts and errors by kind
from OpenAI-shaped responses, identical for every system under test, with nothing
between the client and the server but aiohttp.

One connection per request. llama-server (build 11434) answers a streamed response
with ``Keep-Alive: timeout=5, max=100`` and then closes the connection when the stream
ends; a pooled client that reuses it fails with ``ServerDisconnectedError`` or
``ClientOSError`` through no fault of the system measured. Every request therefore
opens a fresh TCP connection (``force_close``), the same for all systems, and the
report says so. On loopback that costs tens of microseconds, the same for everyone.

Headers are aiohttp's defaults (``Accept-Encoding: gzip, deflate``, as the ``openai``
client sends) plus the system's key; a system that chooses to compress (LiteLLM does)
is decompressed as a real client would.

Timing: ``latency`` runs from just before the request is sent to the last body byte;
``ttft`` to the first body byte (for a stream, the first SSE event). Bodies are parsed
only after the clock stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: a path under the base URL and a JSON body."""

    path: str
    body: Mapping[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class RequestResult:
    """What one request did. Times are seconds; ``sent`` is relative to the run start."""

    sent: float
    latency: float
    ttft: float | None = None
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""  # the answer's content (multi-turn workloads send it back)
    lateness: float = 0.0  # open loop: how far after its scheduled time it was sent

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunResult:
    """Every request of one loop, in completion order, and the loop's wall time."""

    results: list[RequestResult] = field(default_factory=list)
    wall: float = 0.0

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def errors(self) -> Counter[str]:
        return Counter(r.error for r in self.results if r.error is not None)

    def extend(self, other: RunResult) -> None:
        self.results.extend(other.results)
        self.wall += other.wall


def chat_request(
    model: str,
    *,
    stream: bool,
    max_tokens: int = 4,
    prompt: str = "Say hi",
    extra: Mapping[str, Any] | None = None,
) -> RequestSpec:
    """A small OpenAI chat completion; streams ask for the final usage chunk."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if extra:
        body.update(extra)
    return RequestSpec("/v1/chat/completions", body)


def _usage_into(result: RequestResult, obj: Mapping[str, Any]) -> None:
    usage = obj.get("usage")
    if isinstance(usage, Mapping):
        if isinstance(usage.get("prompt_tokens"), int):
            result.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            result.completion_tokens = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping) and isinstance(details.get("cached_tokens"), int):
            result.cached_tokens = details["cached_tokens"]
    timings = obj.get("timings")
    if result.cached_tokens is None and isinstance(timings, Mapping):
        if isinstance(timings.get("cache_n"), int):
            result.cached_tokens = timings["cache_n"]


def parse_body(result: RequestResult, body: bytes, stream: bool) -> None:
    """Fill tokens and errors from a finished response body."""
    if result.status != 200:
        result.error = f"http_{result.status}"
        return
    if not stream:
        try:
            obj = json.loads(body)
        except ValueError:
            result.error = "bad_json"
            return
        if not isinstance(obj, dict) or not obj.get("choices"):
            result.error = "no_choices"
            return
        message = (obj["choices"][0] or {}).get("message") or {}
        result.text = str(message.get("content") or "")
        _usage_into(result, obj)
        return
    content_events = 0
    parts: list[str] = []
    for raw in body.split(b"\n"):
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            result.error = "bad_sse_json"
            return
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            result.error = "sse_error_event"
            return
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content_events += 1
                parts.append(str(delta["content"]))
        _usage_into(result, obj)
    result.text = "".join(parts)
    if content_events == 0 and not result.completion_tokens:
        result.error = "empty_stream"
    elif result.completion_tokens is None:
        result.completion_tokens = content_events


class LoadGenerator:
    """Sends requests to one base URL; use as ``async with LoadGenerator(...) as gen``."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadGenerator:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, spec: RequestSpec, epoch: float | None = None) -> RequestResult:
        """Send one request and measure it. Never raises for a failed request."""
        assert self._session is not None, "use LoadGenerator as an async context manager"
        data = json.dumps(spec.body).encode()
        chunks: list[bytes] = []
        started = time.perf_counter()
        result = RequestResult(sent=started - (epoch if epoch is not None else started), latency=0)
        try:
            async with self._session.post(
                self.base_url + spec.path, data=data, headers=self.headers
            ) as response:
                result.status = response.status
                async for chunk in response.content.iter_any():
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - started
                    chunks.append(chunk)
            result.latency = time.perf_counter() - started
        except aiohttp.ClientError as exc:
            result.latency = time.perf_counter() - started
            result.error = type(exc).__name__
            return result
        except TimeoutError:
            result.latency = time.perf_counter() - started
            result.error = "timeout"
            return result
        parse_body(result, b"".join(chunks), spec.stream)
        return result

    async def closed_loop(
        self, make: Callable[[int], RequestSpec], *, concurrency: int, count: int
    ) -> RunResult:
        """``concurrency`` clients, each sending its next request when the last ends,
        until ``count`` requests have been sent in all."""
        run = RunResult()
        issued = iter(range(count))
        epoch = time.perf_counter()

        async def client() -> None:
            for index in issued:
                run.results.append(await self.send(make(index), epoch))

        await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, count)))))
        run.wall = time.perf_counter() - epoch
        return run

    async def open_loop(
        self, make: Callable[[int], RequestSpec], *, rate: float, count: int, seed: int = 0
    ) -> RunResult:
        """Poisson arrivals at ``rate`` per second, ``count`` in all, each sent at its
        scheduled time whatever is still in flight (no coordinated omission); the time
        each was sent late is kept in ``lateness``."""
        rng = random.Random(seed)
        run = RunResult()
        epoch = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        at = 0.0

        async def fire(index: int, scheduled: float) -> None:
            result = await self.send(make(index), epoch)
            result.lateness = max(0.0, result.sent - scheduled)
            run.results.append(result)

        for index in range(count):
            at += rng.expovariate(rate)
            delay = epoch + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(index, at)))
        await asyncio.gather(*tasks)
        run.wall = time.perf_counter() - epoch
        return run
