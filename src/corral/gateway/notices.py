"""Loading notices: what a streaming chat request hears while its model loads.

A streamed chat completion that has to wait for its model (not loaded yet, queued
behind another load, swapping in, restarting) would otherwise see nothing until the
model is up, seconds or minutes later. With notices on, corral sends the SSE headers
at once and writes ``chat.completion.chunk`` events whose delta has only
``reasoning_content`` (the field chat UIs show as the model's thinking, as
llama-server's own reasoning models send it) saying what is happening::

    corral: loading model beta…
    corral: unloading alpha to make room for beta…
    corral: starting beta…
    corral: beta ready after 3.1 s

then relays the model's own stream (its events only: the head went out already, with
``X-Request-Id`` but without ``X-Corral-Instance``, unknown at that point).
Once the headers are sent an error can no longer be a status code: a load failure,
a buffer timeout or an upstream that fails before answering ends the stream with one
OpenAI-shaped error event (``data: {"error": {...}}``, as corral ends any stream that
fails mid-way), and an upstream answer that is not a stream (a 400 for a bad request)
becomes that event too.

Off by default, as in llama-swap (its ``sendLoadingState``): an API client that does
not expect reasoning text would take it into its transcript. ``loading_notices: true``
turns them on for every model, ``models.ID.loading_notices`` for one (either way), and
a request's ``X-Corral-Loading-Notices: 1`` (or ``0``) wins over both. Only streaming
``/v1/chat/completions`` requests get them; nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral.gateway.errors import sse_error_event
from corral.hosting import ModelState

if TYPE_CHECKING:
    from corral.gateway.exchange import Exchange
    from corral.hosting import Host
    from corral.scheduling.scheduler import Scheduler

#: The request header that turns notices on (``1``) or off (``0``) for one request.
HEADER = "X-Corral-Loading-Notices"

#: The routes whose streaming requests may get notices.
ROUTES = frozenset({"/v1/chat/completions", "/chat/completions"})

_ON = frozenset({"1", "true", "on", "yes"})
_OFF = frozenset({"0", "false", "off", "no"})


class BadNoticeHeader(ValueError):
    """The notices header holds neither an on nor an off value."""


def wanted(
    path: str, body: dict[str, Any] | None, header: str | None, default: Callable[[], bool]
) -> bool:
    """Whether this request gets notices when it has to wait for its model.

    ``default`` gives the configured setting (the model's, else the global one); it is
    only asked when the request is a streaming chat completion with no header."""
    if path not in ROUTES or body is None or body.get("stream") is not True:
        return False
    if header is not None and header.strip():
        value = header.strip().lower()
        if value in _ON:
            return True
        if value in _OFF:
            return False
        raise BadNoticeHeader(f"{HEADER} must be 1 or 0 (true/false, on/off), got {header!r}")
    return default()


def chunk(text: str, *, completion_id: str, model: str, first: bool) -> bytes:
    """One ``chat.completion.chunk`` SSE event carrying ``text`` as reasoning."""
    delta: dict[str, Any] = {"reasoning_content": text}
    if first:
        delta = {"role": "assistant", "content": None, **delta}
    event = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


class LoadingNotices:
    """The notice stream of one request: its SSE response, opened on first need, and
    the scheduler's model events turned into notices while it waits."""

    def __init__(self, ex: Exchange, scheduler: Scheduler, host: Host | None) -> None:
        self.request = ex.request
        self.key = ex.model
        """The pool the request waits for."""
        self.shown_as = ex.model
        """How the notices name it."""
        self.request_id = request_id = ex.request_id
        self.scheduler = scheduler
        self.host = host
        self.response: web.StreamResponse | None = None
        """The client's response once notices began (headers sent); None before."""
        self.sent = 0
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._completion_id = f"chatcmpl-corral-{request_id}"

    # -- while waiting ----------------------------------------------------------------

    def listen(self) -> None:
        """Start collecting the scheduler's model events (before the wait begins, so
        none is missed); :meth:`close` stops it."""
        if self._on_event not in self.scheduler.listeners:
            self.scheduler.listeners.append(self._on_event)

    def close(self) -> None:
        if self._on_event in self.scheduler.listeners:
            self.scheduler.listeners.remove(self._on_event)

    async def wait(self, acquiring: asyncio.Future[Any]) -> None:
        """Write notices until ``acquiring`` (the buffer wait) finishes, starting the
        stream first if it has not started."""
        self.listen()
        if self.response is None:
            await self._open()
            await self.note(self._first_notice())
        while not acquiring.done():
            getter = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait({acquiring, getter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                await self.note(getter.result())
        while not self._queue.empty():
            await self.note(self._queue.get_nowait())

    async def ready(self, waited: float) -> None:
        """The model took the request: the last notice before its own stream."""
        await self.note(f"corral: {self.shown_as} ready after {waited:.1f} s")

    def _first_notice(self) -> str:
        host = self.host
        if host is not None:
            ahead = host.loading
            now = self.scheduler.clock()
            if (
                ahead is not None
                and ahead != self.key
                and host.queued(self.key)
                and not any(i.usable(now) for i in self.scheduler.fleet.pool(ahead))
            ):  # (a model that serves already is only being noted as loaded)
                return f"corral: model {self.shown_as} is queued to load after {ahead}…"
            state = host.state(self.key)
            if state is ModelState.UNLOADING:
                return f"corral: waiting for {self.shown_as} to unload before loading it again…"
            if state is not ModelState.UNLOADED:
                return f"corral: loading model {self.shown_as}…"
        return f"corral: waiting for model {self.shown_as} to become ready…"

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "model":
            return
        model, kind = event.get("model"), event.get("event")
        text: str | None = None
        if model == self.key:
            if kind == "loading":
                text = f"corral: starting {self.shown_as}…"
        elif self.host is not None and self.host.loading == self.key:
            if kind == "unloading":
                text = f"corral: unloading {model} to make room for {self.shown_as}…"
            elif kind == "unloaded":
                text = f"corral: unloaded {model}"
        if text is not None:
            self._queue.put_nowait(text)

    # -- the response -----------------------------------------------------------------

    async def _open(self) -> None:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": self.request_id,
            },
        )
        await response.prepare(self.request)
        self.response = response

    async def note(self, text: str) -> None:
        """Send one notice (the stream must have started)."""
        assert self.response is not None
        await self.response.write(
            chunk(
                text + "\n",
                completion_id=self._completion_id,
                model=self.shown_as,
                first=self.sent == 0,
            )
        )
        self.sent += 1

    async def fail(self, status: int, message: str, error_type: str | None = None) -> None:
        """End the stream with one OpenAI-shaped error event."""
        assert self.response is not None
        await self.response.write(sse_error_event(status, message, error_type))
        await self.response.write_eof()
