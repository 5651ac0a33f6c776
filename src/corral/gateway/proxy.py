"""The inference front door: admission, placement, forwarding and streaming.

One request flows like this: authenticate; read the body once (bounded); find the
model; ask the scheduler for a slot lease (buffering if needed); send one upstream
request; relay the response chunk by chunk as it arrives. If the upstream fails before
the first byte reaches the client, the lease is returned as failed (the instance's
circuit breaker opens) and the request is resent elsewhere. After the first byte, a
stream ends with an OpenAI-shaped error event. The lease is released when the
response ends or the client goes away.

A streaming chat request that waits for its model may get loading notices first
(:mod:`corral.gateway.notices`): then the SSE headers go out before any upstream
answers, and every later failure is an error event in that stream.

llama-server closes a connection after a streamed response while advertising
keep-alive, so a connection that carried a stream is closed, never pooled, and a
request whose pooled connection dies before any response byte is resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.web_protocol import RequestPayloadError

from corral.config import ModelConfig
from corral.gateway.auth import key_matches, presented_key
from corral.gateway.errors import error_response, sse_error_event
from corral.gateway.exchange import Exchange
from corral.gateway.listing import ListingRoutes
from corral.gateway.notices import HEADER as NOTICES_HEADER
from corral.gateway.notices import BadNoticeHeader, LoadingNotices
from corral.gateway.notices import wanted as notices_wanted
from corral.gateway.webui import WebUIRoutes
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.scheduling.policies import Placement
from corral.scheduling.scheduler import (
    Lease,
    ModelRequired,
    Scheduler,
    SchedulingError,
    UnknownInstance,
)
from corral.supervisor.request_flags import HEADERS as FLAG_HEADERS
from corral.supervisor.request_flags import RequestFlagError
from corral.supervisor.request_flags import normalize as normalize_flags

if TYPE_CHECKING:
    from corral.hosting import Host

log = logging.getLogger(__name__)
access_log = logging.getLogger("corral.access")

#: Routes whose POST body names a model and which take a slot.
MODEL_ROUTES = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/completion",
    "/v1/embeddings",
    "/embeddings",
    "/embedding",
    "/v1/responses",
    "/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/responses/input_tokens",
    "/v1/responses/input_tokens",
    "/v1/systemone",
)
#: Routes that take a slot but whose body is not JSON (multipart audio): the model is
#: named by ``X-Model-Id`` or ``?model=``, or is the only one served.
RAW_ROUTES = frozenset({"/v1/audio/transcriptions", "/audio/transcriptions"})
#: Routes that run on a llama-server slot and honour ``id_slot`` in the body (b11434:
#: ``handle_completions_impl``; ``/v1/messages`` drops it in its conversion).
PIN_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/completion",
        "/infill",
    }
)

#: Model routes llama-server answers in its HTTP thread, without a slot: like every
#: other route (``/props``, ``/metrics``, ``/slots``, the web UI), they are answered
#: while all slots are busy (see :meth:`corral.scheduling.scheduler.Scheduler.peek`).
SLOTLESS_ROUTES = frozenset(
    {
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/v1/messages/count_tokens",
        "/chat/completions/input_tokens",
        "/v1/chat/completions/input_tokens",
        "/responses/input_tokens",
        "/v1/responses/input_tokens",
    }
)

#: A request header naming the instance a slotless request (``/slots``, a slot
#: action) is meant for, as the ``X-Corral-Instance`` response header named it.
INSTANCE_HEADER = "X-Corral-Instance"

#: Where a client puts its API key (llama-server reads both).
CLIENT_KEYS = frozenset({"authorization", "x-api-key"})

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "X-Model-Id",
        INSTANCE_HEADER,
        NOTICES_HEADER,
        # aiohttp decodes the body (gzip, deflate, ...): what goes upstream is plain
        "Content-Encoding",
    )
)
#: Request Content-Encodings aiohttp decodes before the body reaches corral; anything
#: else is refused with a 415 rather than forwarded (llama-server decodes none).
DECODED_ENCODINGS = frozenset(
    {"", "identity", "gzip", "deflate"}
    | ({"br"} if HAS_BROTLI else set())
    | ({"zstd"} if HAS_ZSTD else set())
)
RESPONSE_DROP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date")
)
RETRY_STATUSES = frozenset({502, 503})
#: The status recorded for a response its client did not stay for (nginx's 499).
CLIENT_GONE = 499
#: Set on a request once its response is counted, so a cancellation counts it once.
RECORDED: web.RequestKey[bool] = web.RequestKey("corral_recorded", bool)

_request_ids = itertools.count(1)
_REQUEST_PREFIX = os.urandom(3).hex()


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


class IdleWatch:
    """Fails a response body's reader with :class:`TimeoutError` once a read has waited
    ``idle`` seconds for data.

    One timer per response, re-armed only when it fires: a relayed chunk costs a clock
    read instead of a timer created and cancelled (``asyncio.timeout`` around every
    read), which shows at tens of thousands of chunks a second. The relay loop sets
    :attr:`reading_since` before each read and clears it after; time spent writing to
    a slow client does not count, as with a timeout around the read alone.
    """

    __slots__ = ("handle", "idle", "loop", "reader", "reading_since")

    def __init__(self, idle: float, reader: aiohttp.StreamReader) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle = idle
        self.reader = reader
        self.reading_since: float | None = None
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(
            self.loop.time() + idle, self._check
        )

    def _check(self) -> None:
        now = self.loop.time()
        since = self.reading_since
        if since is None:  # not reading now: a full period from here
            self.handle = self.loop.call_at(now + self.idle, self._check)
        elif now - since >= self.idle:
            self.handle = None
            self.reader.set_exception(TimeoutError(f"no data for {self.idle:g} s"))
        else:
            self.handle = self.loop.call_at(since + self.idle, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


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


class UpstreamFailed(Exception):
    """The upstream failed before any response byte reached the client."""


def _under(path: str, prefixes: list[str]) -> bool:
    """Whether the (decoded) ``path`` starts with one of ``prefixes``. A dot segment
    (``/v1/../props``, also percent-encoded) never does: the raw path goes upstream
    as it came, and a server that resolves it would leave the prefix."""
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    return any(path.startswith(prefix) for prefix in prefixes)


def _is_command(config: ModelConfig | None) -> bool:
    """The model is started from a command template (another server, not llama-server)."""
    return config is not None and config.cmd is not None


def with_id_slot(body: bytes, slot: int) -> bytes:
    """``body`` (a JSON object) with ``"id_slot": slot`` as its first member.

    Spliced into the bytes rather than re-serialised, so the rest reaches llama-server
    exactly as the client sent it. The caller pins only bodies that parsed as an object
    without an ``id_slot`` of their own.
    """
    start = body.find(b"{")
    if start < 0:
        return body
    rest = body[start + 1 :]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return b'{"id_slot":%d%s%s' % (slot, separator, rest)


@dataclass
class GatewayOptions:
    api_keys: list[str]
    max_body: int
    body_timeout: float = 60.0
    """Seconds a client has to send its whole request body (then 408)."""
    max_retries: int = 2
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    upstream_api_key: str | None = None
    """llama-server's ``--api-key``, sent upstream when corral checks keys itself."""
    cors_origins: tuple[str, ...] = ()
    expose_slots: bool = False
    loading_notices: bool = False
    """Loading notices for streaming chat requests that wait for their model (see
    :mod:`corral.gateway.notices`); a model's own setting and a request header win."""


class Gateway:
    """The inference HTTP app: routes, auth, forwarding, aggregates."""

    def __init__(
        self, scheduler: Scheduler, metrics: BalancerMetrics, options: GatewayOptions
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.options = options
        self.session: aiohttp.ClientSession | None = None
        self.host: Host | None = None
        """The local model host (``corral serve``): /v1/models lists its catalog too."""
        self.traffic: RecentTraffic | None = None
        """Recent traffic per model for the dashboard, when the balancer keeps it."""
        self._warming: dict[str, set[asyncio.Task[None]]] = {}
        """Spare upstream connections being opened, by instance URL (see :meth:`_warm`)."""
        self.app = web.Application(client_max_size=options.max_body)
        self.listing = ListingRoutes(self)
        """The front door's own answers: ``/health``, ``/v1/models``, the slots aggregate."""
        for route in MODEL_ROUTES:
            self.app.router.add_post(route, self.forward)
        self.webui = WebUIRoutes(self)
        """Router mode's routes for llama-server's web UI (``/props``, ``/models/sse``)."""
        self.app.router.add_route("*", "/{tail:.*}", self.passthrough)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)
        self.app.on_response_prepare.append(self._cors_headers)

    async def _start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout),
        )

    async def _stop(self, app: web.Application) -> None:
        for tasks in list(self._warming.values()):
            for task in list(tasks):
                task.cancel()
        if self.session is not None:
            await self.session.close()

    def _warm(self, url: str, streams: int) -> None:
        """Put a spare connection to ``url`` in the pool, in the background.

        llama-server closes a connection after every stream, so without a spare the next
        request to it waits for a new TCP connection (on loopback that alone is about
        0.4 ms of this process's time; across hosts, a round trip more). When a stream
        starts, a ``GET /health`` (public, not logged by llama-server, answered without
        the model) opens a connection that stays pooled for the next request; when the
        pool already holds an idle one, it reuses that and adds none. At most one is
        being opened per stream in flight there (``streams``), so the spares never
        outnumber the instance's slots; a failure only means the next request connects
        itself.
        """
        tasks = self._warming.setdefault(url, set())
        if len(tasks) >= streams or self.session is None or self.session.closed:
            return
        task = asyncio.ensure_future(self._open_spare(url))
        tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not tasks and self._warming.get(url) is tasks:
                del self._warming[url]

        task.add_done_callback(done)

    async def _open_spare(self, url: str) -> None:
        assert self.session is not None
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                async with self.session.get(url.rstrip("/") + "/health") as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("spare connection to %s failed: %s", url, exc)

    # -- hygiene ------------------------------------------------------------------------

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS by corral's rules when ``cors_origins`` is set: llama-server's own
        ``Access-Control-*`` headers are dropped (it reflects any origin by default) and
        an allowed origin gets corral's. Unset, llama-server's pass through untouched,
        preflights included (see :meth:`_preflight`), as if corral were not there."""
        if not self.options.cors_origins:
            return
        for name in [h for h in response.headers if h.lower().startswith("access-control-")]:
            del response.headers[name]
        origin = request.headers.get("Origin")
        if origin and (origin in self.options.cors_origins or "*" in self.options.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @staticmethod
    def _is_preflight(request: web.Request) -> bool:
        return (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        )

    def _preflight(self, request: web.Request) -> web.Response | None:
        """corral's answer to a CORS preflight when ``cors_origins`` is set; None for
        any other request, and for every preflight when it is not (the instance answers
        it, by llama-server's ``--cors-origins`` rules)."""
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or not origin or not self.options.cors_origins:
            return None
        if origin not in self.options.cors_origins and "*" not in self.options.cors_origins:
            return error_response(403, f"origin {origin!r} is not allowed by CORS")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"
                ),
                "Access-Control-Max-Age": "600",
            },
        )

    def unauthorized(self, request: web.Request) -> web.Response | None:
        if not self.options.api_keys or self._is_preflight(request):
            return None  # a browser never sends credentials with a preflight
        if key_matches(presented_key(request), self.options.api_keys):
            return None
        return error_response(
            401,
            "missing or invalid API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )

    # -- forwarding ----------------------------------------------------------------------

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Paths corral doesn't route by model (e.g. the web UI) go to the default model,
        or, when several are served and the request names none, to any ready instance
        (every llama-server serves the same web UI), starting the first listed model
        when none is ready."""
        preflight = self._preflight(request)
        if preflight is not None:
            return preflight
        return await self.forward(request)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Admission (auth, body, model, flags, filters), then :meth:`_relay`."""
        route = (
            request.path if request.path in MODEL_ROUTES or request.path in RAW_ROUTES else "other"
        )
        ex = Exchange(
            request,
            request.headers.get("X-Request-Id") or f"{_REQUEST_PREFIX}-{next(_request_ids)}",
            route,
        )
        denied = self._preflight(request) or self.unauthorized(request)
        if denied is not None:
            return self._finish(denied, ex)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in DECODED_ENCODINGS:
            return self._unread_body(
                ex, 415,
                f"Content-Encoding {encoding!r} is not supported; send the body as is, or "
                "encoded with one of: " + ", ".join(sorted(DECODED_ENCODINGS - {"", "identity"})),
            )  # fmt: skip
        try:
            async with asyncio.timeout(self.options.body_timeout):
                body = await request.read()
        except TimeoutError:
            return self._unread_body(
                ex, 408,
                f"the request body did not arrive within {self.options.body_timeout:g} s "
                "(client_body_timeout)",
            )  # fmt: skip
        except web.HTTPRequestEntityTooLarge:
            limit = f"request body is larger than the {self.options.max_body}-byte limit"
            return self._finish(error_response(413, limit), ex)
        except RequestPayloadError as exc:
            # a body its Content-Encoding does not decode (or a broken chunk): the
            # client's fault, and the rest of it is unreadable
            return self._unread_body(
                ex, 400,
                f"request body could not be read: {str(exc).splitlines()[-1].strip()} "
                f"(Content-Encoding: {encoding or 'none'})",
            )  # fmt: skip
        parsed: dict[str, Any] | None = None
        if body and request.method == "POST" and route in MODEL_ROUTES:
            try:
                value = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                bad = f"request body is not valid JSON: {exc}"
                return self._finish(error_response(400, bad), ex)
            except RecursionError:
                deep = "request body is not valid JSON: it is nested too deeply"
                return self._finish(error_response(400, deep), ex)
            if not isinstance(value, dict):
                return self._finish(error_response(400, "request body must be a JSON object"), ex)
            parsed = value
        requested = request.headers.get("X-Model-Id")
        if requested is None and parsed is not None:
            raw = parsed.get("model")
            if raw is not None and not isinstance(raw, str):
                return self._finish(error_response(400, "`model` must be a string"), ex)
            requested = raw
        if requested is None:
            requested = request.query.get("model")
        try:
            try:
                model = self.scheduler.resolve_model(requested)
            except ModelRequired:
                if route != "other":
                    raise
                model = self._any_model()
        except SchedulingError as exc:
            # never a client's made-up name as a metric label (unbounded series): it is
            # logged as asked, the model label stays empty
            ex.asked = requested or ""
            return self._finish(
                error_response(exc.status, exc.message, exc.error_type, exc.headers), ex
            )
        ex.model = model
        # the model's settings, looked up once (a per-request flags key has its model's)
        ex.config = self.host.model_config(model) if self.host is not None else None
        refused = self._command_refusal(ex)
        if refused is not None:
            return self._finish(refused, ex)
        if parsed is not None:
            filtered = self._filtered(ex.config, requested, parsed)
            if filtered is not None:
                parsed, body = filtered, json.dumps(filtered).encode()
        flags_error = self._apply_flags(request, model)
        if isinstance(flags_error, web.Response):
            return self._finish(flags_error, ex)
        ex.model = model = flags_error
        session = request.headers.get("X-Session-Id")
        wanted = request.headers.get(INSTANCE_HEADER)
        ex.placement = Placement(
            model=model,
            body=parsed,
            headers={
                **({"x-session-id": session} if session else {}),
                **({"x-corral-instance": wanted} if wanted else {}),
            },
            pinnable=route in PIN_ROUTES and not _is_command(ex.config),
            slotless=route == "other" or route in SLOTLESS_ROUTES or request.method != "POST",
        )
        try:
            ex.notices = self._notices(ex, parsed)
        except BadNoticeHeader as exc:
            return self._finish(error_response(400, str(exc)), ex)
        try:
            return await self._relay(ex, body)
        except asyncio.CancelledError:
            # the client left before its response began (in the buffer, say)
            if not request.get(RECORDED):
                ex.instance, ex.waited = "", 0.0
                self._record(ex, CLIENT_GONE)
            raise
        except SchedulingError as exc:
            ex.instance, ex.waited = "", 0.0  # no instance answered: logged as none
            return self._finish(
                error_response(exc.status, exc.message, exc.error_type, exc.headers), ex
            )
        finally:
            if ex.notices is not None:
                ex.notices.close()

    def _notices(self, ex: Exchange, parsed: dict[str, Any] | None) -> LoadingNotices | None:
        """The loading notices of a request that wants them (it may never wait)."""

        def configured() -> bool:
            config = ex.config
            if config is not None and config.loading_notices is not None:
                return config.loading_notices
            return self.options.loading_notices

        header = ex.request.headers.get(NOTICES_HEADER)
        if not notices_wanted(ex.request.path, parsed, header, configured):
            return None
        return LoadingNotices(
            ex.request,
            key=ex.model,
            shown_as=ex.model,
            request_id=ex.request_id,
            scheduler=self.scheduler,
            host=self.host,
        )

    @staticmethod
    def _filtered(
        config: ModelConfig | None, requested: str | None, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """``body`` as the model's ``filters`` and ``use_model_name`` change it, or None
        when they change nothing (the client's bytes then go upstream untouched)."""
        if config is None or (config.filters is None and config.use_model_name is None):
            return None
        out = dict(body)
        filters = config.filters
        if filters is not None:
            for key in filters.strip_params:
                out.pop(key, None)
            out.update(filters.set_params)
            out.update(filters.set_params_by_name.get(requested or "", {}))
        if config.use_model_name is not None:
            out["model"] = config.use_model_name
        return out

    @staticmethod
    def _command_refusal(ex: Exchange) -> web.Response | None:
        """For a model started from a command template (another server, not
        llama-server): a 404 for a path it does not serve, a 400 for llama-server flags."""
        request, model, config = ex.request, ex.model, ex.config
        if config is None or config.cmd is None:
            return None
        program = config.cmd[0].rsplit("/", 1)[-1]
        if not _under(request.path, config.paths):
            return error_response(
                404,
                f"model {model!r} is served by {program!r}, which serves only paths starting "
                f"with {', '.join(config.paths)}; {request.method} {request.path} is not one "
                f"of them (models.{model}.paths)",
            )
        if any(request.headers.get(h, "").strip() for h in FLAG_HEADERS):
            return error_response(
                400,
                f"per-request llama-server flags (X-Corral-Flags) do not apply to model "
                f"{model!r}: it is served by {program!r}, not llama-server",
            )
        return None

    def _any_model(self) -> str:
        """A model for a request that names none and may go anywhere (the web UI's
        page and assets): a ready instance's, else the first model the host lists."""
        now = self.scheduler.clock()
        ready = sorted(
            (i for i in self.scheduler.fleet.instances.values() if i.usable(now)),
            key=lambda i: i.id,
        )
        if ready:
            return ready[0].model
        listed = self.host.listed() if self.host is not None else []
        if listed:
            return listed[0]
        raise ModelRequired(
            "this server serves several models and none is ready; set `model` to one of: "
            + ", ".join(self.scheduler.askable_names())
        )

    def _apply_flags(self, request: web.Request, model: str) -> str | web.Response:
        """The pool for ``model`` run with the request's llama-server flags (the
        ``X-Corral-Flags`` header), or a 400 naming what is wrong with them."""
        raw = next((request.headers[h] for h in FLAG_HEADERS if h in request.headers), "")
        if not raw.strip():
            return model
        if self.host is None or self.host.resolve(model) is None:
            return error_response(
                400,
                "per-request llama-server flags (X-Corral-Flags) apply to models that "
                "`corral serve` starts; this model's servers are run by a remote agent",
            )
        try:
            flags = normalize_flags(raw)
        except RequestFlagError as exc:
            return error_response(400, str(exc))
        key = self.host.flagged_key(model, flags)
        refused = self.host.refuse_flags(key)
        if refused is not None:
            return error_response(400, refused)
        return key

    def _unread_body(self, ex: Exchange, status: int, message: str) -> web.StreamResponse:
        """corral's error for a request whose body it will not read to the end: what is
        left of the body is dropped (aiohttp would linger reading it) and the connection
        closes after the answer."""
        ex.request.content.feed_eof()
        response = error_response(status, message)
        response.force_close()
        return self._finish(response, ex)

    def _finish(self, response: web.StreamResponse, ex: Exchange) -> web.StreamResponse:
        """Answer with corral's own response (an error, a preflight): no upstream byte."""
        response.headers["X-Request-Id"] = ex.request_id
        self._record(ex, response.status)
        return response

    def _record(
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

    def _upstream_headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        """The client's headers as llama-server gets them.

        Keys: when corral checks keys (``api_keys``), the client's key is corral's and
        stays here; llama-server gets its own key (``llama_server_api_key``) when one is
        set. When corral checks none, the client's key goes through untouched, so a
        llama-server with ``--api-key`` checks it as it would without corral.
        """
        checked = bool(self.options.api_keys)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and not (checked and k.lower() in CLIENT_KEYS)
        }
        if checked and self.options.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.options.upstream_api_key}"
        headers["X-Request-Id"] = request_id
        return headers

    async def _open(
        self, request: web.Request, body: bytes, lease: Lease, headers: dict[str, str]
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the request upstream and read its head and first chunk.

        Returns the response and its first body chunk (b"" at end of body). Raises
        :class:`UpstreamFailed` for anything that lets the request be resent: refused,
        reset, a 502/503, or a connection that died before the first body byte.
        """
        assert self.session is not None
        url = lease.instance.url.rstrip("/") + request.rel_url.raw_path_qs
        if lease.slot is not None:
            body = with_id_slot(body, lease.slot)
        for attempt in (0, 1):
            response: aiohttp.ClientResponse | None = None
            try:
                async with asyncio.timeout(self.options.first_byte_timeout):
                    response = await self.session.request(
                        request.method,
                        url,
                        data=body or None,
                        headers=headers,
                        allow_redirects=False,
                    )
                    if response.status in RETRY_STATUSES:
                        detail = (await response.read())[:200].decode(errors="replace")
                        response.release()
                        raise UpstreamFailed(f"upstream answered {response.status}: {detail}")
                    if response.content_type == "text/event-stream":
                        # llama-server closes a connection after a stream while
                        # advertising keep-alive: never let the pool reuse this one
                        # (aiohttp would return it to the pool when the body ends)
                        connection = response.connection
                        if connection is not None and connection.protocol is not None:
                            connection.protocol.force_close()
                        self._warm(lease.instance.url, lease.instance.in_flight)
                    first = await response.content.readany()
                    return response, first
            except UpstreamFailed:
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if response is not None:
                    response.close()
                if attempt == 0 and not isinstance(exc, aiohttp.ClientConnectorError):
                    # a pooled connection the server had already closed: resend
                    self.metrics.stale_connections.inc()
                    continue
                raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
            except aiohttp.ClientError as exc:
                if response is not None:
                    response.close()
                raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
            except TimeoutError:
                if response is not None:
                    response.close()
                raise SchedulingError(
                    f"instance {lease.instance.id} sent no response within "
                    f"{self.options.first_byte_timeout:g} s"
                ) from None
        raise AssertionError("unreachable")

    async def _acquire(
        self,
        model: str,
        placement: Placement,
        exclude: frozenset[str],
        notices: LoadingNotices | None,
    ) -> tuple[Lease, bool]:
        """A lease, as :meth:`Scheduler.acquire` gives it; with ``notices``, the wait
        for a model that is not ready is told to the client as it goes. Returns the
        lease and whether notices were written during this wait."""
        if placement.slotless:
            wanted = placement.headers.get("x-corral-instance")
            lease = self.scheduler.peek(model, exclude, wanted)
            if lease is not None:
                return lease, False
            if wanted is not None:
                raise UnknownInstance(
                    f"instance {wanted!r} is not a ready instance of model {model!r}; "
                    "GET /api/v1/instances lists them"
                )
            # nothing ready: wait for a slot like any request (and start the model)
        if notices is None:
            return await self.scheduler.acquire(model, placement, exclude), False
        notices.listen()  # before the wait begins: no event is missed
        acquiring = asyncio.ensure_future(self.scheduler.acquire(model, placement, exclude))
        noticed = False
        try:
            await asyncio.sleep(0)  # it either has a lease (or an error) now, or waits
            if not acquiring.done() and (
                notices.response is not None or not self._model_ready(model)
            ):
                noticed = True
                await notices.wait(acquiring)
            return await acquiring, noticed
        except BaseException:
            if not acquiring.done():
                acquiring.cancel()  # the scheduler drops the waiter (or its lease)
                with contextlib.suppress(asyncio.CancelledError, SchedulingError):
                    await acquiring
            elif not acquiring.cancelled() and acquiring.exception() is None:
                self.scheduler.release(acquiring.result(), "client_gone")
            raise

    def _model_ready(self, model: str) -> bool:
        now = self.scheduler.clock()
        return any(i.usable(now) for i in self.scheduler.fleet.pool(model))

    async def _relay(self, ex: Exchange, body: bytes) -> web.StreamResponse:
        """Lease, send, retry elsewhere before the first byte, then :meth:`_stream`."""
        assert ex.placement is not None
        model, notices = ex.model, ex.notices
        exclude: set[str] = set()
        headers = self._upstream_headers(ex.request, ex.request_id)
        failures: list[str] = []
        while True:
            try:
                lease, noticed = await self._acquire(
                    model, ex.placement, frozenset(exclude), notices
                )
            except SchedulingError as exc:
                if not failures and (notices is None or notices.response is None):
                    raise
                status, message = exc.status, exc.message
                error_type: str | None = exc.error_type
                if failures:
                    # instances failed and none could take the retry in time: say why
                    status, error_type = 502, None
                    message = (
                        "every instance tried failed before answering ("
                        + "; ".join(failures)
                        + f"), and no other became available: {exc.message}"
                    )
                ex.instance = ""
                return await self._refuse(ex, status, message, error_type)
            ex.waited += lease.waited
            if lease.waited:
                self.metrics.buffer_wait.labels(model).observe(lease.waited)
            ex.instance = lease.instance.id
            with lease:  # released on leaving, as lease.outcome says (client_gone unless set)
                if noticed and notices is not None:
                    await notices.ready(lease.waited)
                try:
                    upstream, first = await self._open(ex.request, body, lease, headers)
                except UpstreamFailed as exc:
                    lease.outcome = "upstream_failed"
                    failures.append(f"{lease.instance.id}: {exc}")
                    log.warning(
                        "upstream failed before first byte request_id=%s instance=%s error=%s",
                        ex.request_id,
                        lease.instance.id,
                        exc,
                    )
                    exclude.add(lease.instance.id)
                    if len(failures) > self.options.max_retries:
                        return await self._refuse(
                            ex, 502,
                            "every instance tried failed before answering: " + "; ".join(failures),
                            None,
                        )  # fmt: skip
                    self.metrics.retries.labels(model).inc()
                    if notices is not None and notices.response is not None:
                        await notices.note(
                            f"corral: {lease.instance.id} failed before answering; trying again…"
                        )
                    continue
                except SchedulingError as exc:  # no response head in time
                    if notices is None or notices.response is None:
                        raise
                    return await self._refuse(ex, exc.status, exc.message, exc.error_type)
                lease.outcome = "ok"
                return await self._stream(ex, upstream, first, lease)

    async def _refuse(
        self, ex: Exchange, status: int, message: str, error_type: str | None
    ) -> web.StreamResponse:
        """corral's error for a request no instance answered: a JSON error with its
        status, or, once notices have sent the headers, an error event ending the
        stream (recorded with the error's status all the same)."""
        notices = ex.notices
        if notices is None or notices.response is None:
            return self._finish(error_response(status, message, error_type), ex)
        await notices.fail(status, message, error_type)
        self._record(ex, status)
        return notices.response

    async def _stream(
        self, ex: Exchange, upstream: aiohttp.ClientResponse, first: bytes, lease: Lease
    ) -> web.StreamResponse:
        """Relay the instance's answer chunk by chunk, then record it and learn from it."""
        request, placement, notices = ex.request, ex.placement, ex.notices
        is_sse = upstream.content_type == "text/event-stream"
        prepared = notices.response if notices is not None else None
        if prepared is not None and (upstream.status != 200 or not is_sse):
            return await self._answer_in_stream(ex, upstream, first, prepared)
        tail = ResponseTail(is_sse)
        if prepared is not None:
            response = prepared  # the notices sent the head: only the events follow
        else:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in RESPONSE_DROP:
                    response.headers.add(key, value)
            response.headers["X-Request-Id"] = ex.request_id
            response.headers["X-Corral-Instance"] = lease.instance.id
            if lease.slot is not None:
                response.headers["X-Corral-Slot"] = str(lease.slot)
            if upstream.content_length is not None and not is_sse:
                response.content_length = upstream.content_length
        ttft = time.monotonic() - ex.started
        clean = False
        watch: IdleWatch | None = None
        try:
            if prepared is None:
                await response.prepare(request)
            if first:
                tail.add(first)
                await response.write(first)
            if first or not upstream.content.at_eof():
                content = upstream.content
                watch = IdleWatch(self.options.idle_timeout, content)
                while True:
                    try:
                        watch.reading_since = watch.loop.time()
                        chunk = await content.readany()
                        watch.reading_since = None
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                        log.warning(
                            "upstream failed mid-response request_id=%s instance=%s error=%s",
                            ex.request_id,
                            lease.instance.id,
                            reason,
                        )
                        if is_sse:
                            await response.write(
                                sse_error_event(
                                    502,
                                    f"instance {lease.instance.id} failed mid-stream "
                                    f"({reason}); the response is incomplete",
                                )
                            )
                            await response.write_eof()
                        else:
                            # the status is already sent: drop the connection so the
                            # client sees a truncated response, not a complete one
                            if request.transport is not None:
                                request.transport.close()
                        self._record(ex, 502, ttft)
                        return response
                    if not chunk:
                        break
                    tail.add(chunk)
                    await response.write(chunk)
            await response.write_eof()
            clean = True
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # the client went away (a write to its closed connection, or aiohttp
            # cancelling this handler when it saw the disconnect): an ordinary event,
            # logged without a traceback and counted as 499 (nginx's "client closed
            # request"). Often it had everything: the openai client closes a stream at
            # `data: [DONE]`, racing the final chunk; then it counts as what it was.
            # What the server generated counts either way (tokens, cache feedback).
            usage = tail.usage() if response.status == 200 else TokenUsage()
            status = response.status if usage.generated is not None else CLIENT_GONE
            log.info(
                "client went away mid-response request_id=%s instance=%s",
                ex.request_id,
                lease.instance.id,
            )
            self._record(ex, status, ttft, usage)
            if usage.generated is not None:
                self._learn(usage, lease, placement, time.monotonic() - ex.started)
            request[RECORDED] = True
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response  # aiohttp sees the closed connection and writes nothing more
        finally:
            if watch is not None:
                watch.cancel()
            if is_sse or not clean:
                upstream.close()  # never pool a connection that carried a stream
            else:
                upstream.release()
        usage = tail.usage() if response.status == 200 else TokenUsage()
        self._record(ex, response.status, ttft, usage)
        if response.status == 200:
            self._learn(usage, lease, placement, time.monotonic() - ex.started)
        return response

    async def _answer_in_stream(
        self,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        response: web.StreamResponse,
    ) -> web.StreamResponse:
        """An upstream answer that is not a stream (an error such as a 400), after
        notices sent the head: its error becomes the stream's error event."""
        notices = ex.notices
        assert notices is not None
        data = bytearray(first)
        try:
            while len(data) < ResponseTail.LIMIT:
                async with asyncio.timeout(self.options.idle_timeout):
                    chunk = await upstream.content.readany()
                if not chunk:
                    break
                data += chunk
        except (aiohttp.ClientError, TimeoutError):
            pass  # what came is what there is
        finally:
            upstream.close()
        status = upstream.status if upstream.status >= 400 else 502
        answer: Any = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            answer = json.loads(bytes(data))
        error = answer.get("error") if isinstance(answer, dict) else None
        error_type: str | None = None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
            error_type = error["type"] if isinstance(error.get("type"), str) else None
        else:
            text = bytes(data[:300]).decode(errors="replace").strip()
            message = f"instance {ex.instance} answered {upstream.status}" + (
                f" instead of a stream: {text}" if text else " instead of a stream"
            )
        await notices.fail(status, message, error_type)
        self._record(ex, status)
        return response

    def _learn(
        self,
        usage: TokenUsage,
        lease: Lease,
        placement: Placement | None,
        seconds: float,
    ) -> None:
        """Count prompt (cached and uncached) and generated tokens, and tell a
        cache-aware policy what the server really reused (``timings.cache_n`` /
        ``usage``)."""
        instance = lease.instance
        if usage.generated is not None:
            self.metrics.generated_tokens.labels(instance.model, instance.id).inc(usage.generated)
        if usage.cached is None or usage.prompt is None:
            return
        cached, prompt, prompt_seconds = usage.cached, usage.prompt, usage.prompt_seconds
        self.metrics.prompt_tokens.labels(instance.model, instance.id, "cached").inc(cached)
        self.metrics.prompt_tokens.labels(instance.model, instance.id, "uncached").inc(
            max(0, prompt - cached)
        )
        if placement is not None:
            self.scheduler.policy.record_cached(
                instance.id,
                placement.model,
                placement.body,
                cached,
                prompt,
                prompt_seconds=prompt_seconds,
                total_seconds=seconds,
            )
