"""Admission: what a request passes before it is placed.

In order: the API key (:meth:`Admission.guarded`, on every route of the front door
but ``/health``), then, for a request to be forwarded (:meth:`Admission.admit`): a
CORS preflight corral answers itself, the body (its encoding, size and arrival time,
JSON when the route reads a model from it), the model it names (resolved once, its
settings looked up once), a command-template model's paths and flags, the model's
``filters``, the per-request llama-server flags (``X-Corral-Flags``: a pool of its
own), the placement the scheduler gets, and the loading notices it may want. Every
refusal is corral's OpenAI-shaped error, counted like any answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.web_protocol import RequestPayloadError

from corral.config import ModelConfig
from corral.gateway.accounting import Accounting
from corral.gateway.auth import key_matches, presented_key
from corral.gateway.errors import error_response
from corral.gateway.exchange import Exchange
from corral.gateway.notices import HEADER as NOTICES_HEADER
from corral.gateway.notices import BadNoticeHeader, LoadingNotices
from corral.gateway.notices import wanted as notices_wanted
from corral.gateway.options import GatewayOptions
from corral.gateway.upstream import INSTANCE_HEADER
from corral.scheduling.policies import Placement
from corral.scheduling.scheduler import ModelRequired, Scheduler, SchedulingError
from corral.supervisor.request_flags import HEADERS as FLAG_HEADERS
from corral.supervisor.request_flags import RequestFlagError
from corral.supervisor.request_flags import normalize as normalize_flags

if TYPE_CHECKING:
    from corral.hosting import Host
    from corral.observe.tracing import Tracing

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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Request Content-Encodings aiohttp decodes before the body reaches corral; anything
#: else is refused with a 415 rather than forwarded (llama-server decodes none).
DECODED_ENCODINGS = frozenset(
    {"", "identity", "gzip", "deflate"}
    | ({"br"} if HAS_BROTLI else set())
    | ({"zstd"} if HAS_ZSTD else set())
)
_request_ids = itertools.count(1)
_REQUEST_PREFIX = os.urandom(3).hex()


def open_exchange(request: web.Request) -> Exchange:
    """A new exchange for ``request``: its id (the client's ``X-Request-Id``, else
    corral's), its route label, its start.

    Not kept on the request: the exchange refers to the request, and a request that
    referred back would be a reference cycle, freed only by the cyclic collector, with
    everything the request holds (measured: about 6% of the front door's capacity)."""
    path = request.path
    route = path if path in MODEL_ROUTES or path in RAW_ROUTES else "other"
    request_id = request.headers.get("X-Request-Id")
    if not request_id:
        request_id = f"{_REQUEST_PREFIX}-{next(_request_ids)}"
    return Exchange(request, request_id, route)


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


class Refusal(Exception):
    """An admission step refuses the request with ``response`` (corral's own error);
    :meth:`Admission.admit` counts and returns it."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response

    @classmethod
    def of(cls, status: int, message: str) -> Refusal:
        return cls(error_response(status, message))


class Admission:
    """The front door's admission steps; see the module doc."""

    def __init__(
        self, scheduler: Scheduler, options: GatewayOptions, accounting: Accounting
    ) -> None:
        self.scheduler = scheduler
        self.options = options
        self.accounting = accounting
        self.host: Host | None = None
        self.tracing: Tracing | None = None
        """Traces, when the ``OTEL_*`` variables turn them on: each exchange gets one."""

    def exchange(self, request: web.Request) -> Exchange:
        """:func:`open_exchange`, with its trace begun when traces are on."""
        ex = open_exchange(request)
        if self.tracing is not None:
            ex.trace = self.tracing.request(request, ex.route, ex.request_id)
        return ex

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the API key: the front door's auth middleware, which
        :meth:`corral.gateway.proxy.Gateway.route` puts in front of every route but
        ``/health``. Bound once per route rather than by aiohttp's middleware chain,
        which wraps the handler anew (``partial`` and ``update_wrapper``) for every
        request."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            denied = self.unauthorized(request)
            if denied is not None:
                return self.accounting.finish(denied, self.exchange(request))
            return await handler(request)

        return guarded

    async def cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS by corral's rules when ``cors_origins`` is set: llama-server's own
        ``Access-Control-*`` headers are dropped (it reflects any origin by default) and
        an allowed origin gets corral's. Unset, llama-server's pass through untouched,
        preflights included (see :meth:`preflight`), as if corral were not there."""
        if not self.options.cors_origins:
            return
        for name in [h for h in response.headers if h.lower().startswith("access-control-")]:
            del response.headers[name]
        origin = request.headers.get("Origin")
        if origin and (origin in self.options.cors_origins or "*" in self.options.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        )

    def preflight(self, request: web.Request) -> web.Response | None:
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
        if not self.options.api_keys or self.is_preflight(request):
            return None  # a browser never sends credentials with a preflight
        if key_matches(presented_key(request), self.options.api_keys):
            return None
        return error_response(
            401,
            "missing or invalid API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def admit(self, request: web.Request) -> Exchange | web.StreamResponse:
        """The request's exchange, ready for placement (model, settings, flags,
        filters, placement, notices, body), or corral's refusal, counted."""
        ex = self.exchange(request)
        try:
            preflight = self.preflight(request)
            if preflight is not None:
                raise Refusal(preflight)
            body = await self._read_body(ex)
            parsed = self._json(ex, body)
            requested = self._asked(ex, parsed)
            self._resolve(ex, requested)
            self._command_refusal(ex)
            if parsed is not None:
                filtered = self._filtered(ex.config, requested, parsed)
                if filtered is not None:
                    parsed, body = filtered, json.dumps(filtered).encode()
            ex.model = self._apply_flags(request, ex.model)
            ex.placement = self._placement(ex, parsed)
            ex.notices = self._notices(ex, parsed)
        except Refusal as refusal:
            return self.accounting.finish(refusal.response, ex)
        ex.body = body
        return ex

    async def _read_body(self, ex: Exchange) -> bytes:
        """The whole body, decoded, within its size and time limits."""
        request = ex.request
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in DECODED_ENCODINGS:
            raise self._unread_body(
                ex, 415,
                f"Content-Encoding {encoding!r} is not supported; send the body as is, or "
                "encoded with one of: " + ", ".join(sorted(DECODED_ENCODINGS - {"", "identity"})),
            )  # fmt: skip
        try:
            async with asyncio.timeout(self.options.body_timeout):
                return await request.read()
        except TimeoutError:
            raise self._unread_body(
                ex, 408,
                f"the request body did not arrive within {self.options.body_timeout:g} s "
                "(client_body_timeout)",
            ) from None  # fmt: skip
        except web.HTTPRequestEntityTooLarge:
            limit = f"request body is larger than the {self.options.max_body}-byte limit"
            raise Refusal.of(413, limit) from None
        except RequestPayloadError as exc:
            # a body its Content-Encoding does not decode (or a broken chunk): the
            # client's fault, and the rest of it is unreadable
            raise self._unread_body(
                ex, 400,
                f"request body could not be read: {str(exc).splitlines()[-1].strip()} "
                f"(Content-Encoding: {encoding or 'none'})",
            ) from None  # fmt: skip

    @staticmethod
    def _json(ex: Exchange, body: bytes) -> dict[str, Any] | None:
        """The body as a JSON object on a model route; None elsewhere (and when empty)."""
        if not body or ex.request.method != "POST" or ex.route not in MODEL_ROUTES:
            return None
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refusal.of(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            deep = "request body is not valid JSON: it is nested too deeply"
            raise Refusal.of(400, deep) from None
        if not isinstance(value, dict):
            raise Refusal.of(400, "request body must be a JSON object")
        return value

    @staticmethod
    def _asked(ex: Exchange, parsed: dict[str, Any] | None) -> str | None:
        """The model the request names: ``X-Model-Id``, else the body's ``model``, else
        ``?model=``; None when it names none."""
        request = ex.request
        requested = request.headers.get("X-Model-Id")
        if requested is None and parsed is not None:
            raw = parsed.get("model")
            if raw is not None and not isinstance(raw, str):
                raise Refusal.of(400, "`model` must be a string")
            requested = raw
        if requested is None:
            requested = request.query.get("model")
        return requested

    def _resolve(self, ex: Exchange, requested: str | None) -> None:
        """The pool the request goes to, and its model's settings, looked up once (a
        per-request flags key later has its model's)."""
        try:
            try:
                ex.model = self.scheduler.resolve_model(requested)
            except ModelRequired:
                if ex.route != "other":
                    raise
                ex.model = self._any_model()
        except SchedulingError as exc:
            # never a client's made-up name as a metric label (unbounded series): it is
            # logged as asked, the model label stays empty
            ex.asked = requested or ""
            raise Refusal(
                error_response(exc.status, exc.message, exc.error_type, exc.headers)
            ) from None
        ex.config = self.host.model_config(ex.model) if self.host is not None else None

    @staticmethod
    def _placement(ex: Exchange, parsed: dict[str, Any] | None) -> Placement:
        """What the scheduler and its policy see of the request."""
        request, route = ex.request, ex.route
        headers: dict[str, str] = {}
        session = request.headers.get("X-Session-Id")
        if session:
            headers["x-session-id"] = session
        wanted = request.headers.get(INSTANCE_HEADER)
        if wanted:
            headers["x-corral-instance"] = wanted
        return Placement(
            model=ex.model,
            body=parsed,
            headers=headers,
            pinnable=route in PIN_ROUTES and not _is_command(ex.config),
            slotless=route == "other" or route in SLOTLESS_ROUTES or request.method != "POST",
        )

    def _notices(self, ex: Exchange, parsed: dict[str, Any] | None) -> LoadingNotices | None:
        """The loading notices of a request that wants them (it may never wait)."""

        def configured() -> bool:
            config = ex.config
            if config is not None and config.loading_notices is not None:
                return config.loading_notices
            return self.options.loading_notices

        header = ex.request.headers.get(NOTICES_HEADER)
        try:
            if not notices_wanted(ex.request.path, parsed, header, configured):
                return None
        except BadNoticeHeader as exc:
            raise Refusal.of(400, str(exc)) from None
        return LoadingNotices(ex, self.scheduler, self.host)

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
    def _command_refusal(ex: Exchange) -> None:
        """For a model started from a command template (another server, not
        llama-server): a 404 for a path it does not serve, a 400 for llama-server flags."""
        request, model, config = ex.request, ex.model, ex.config
        if config is None or config.cmd is None:
            return
        program = config.cmd[0].rsplit("/", 1)[-1]
        if not _under(request.path, config.paths):
            raise Refusal.of(
                404,
                f"model {model!r} is served by {program!r}, which serves only paths starting "
                f"with {', '.join(config.paths)}; {request.method} {request.path} is not one "
                f"of them (models.{model}.paths)",
            )
        if any(request.headers.get(h, "").strip() for h in FLAG_HEADERS):
            raise Refusal.of(
                400,
                f"per-request llama-server flags (X-Corral-Flags) do not apply to model "
                f"{model!r}: it is served by {program!r}, not llama-server",
            )

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

    def _apply_flags(self, request: web.Request, model: str) -> str:
        """The pool for ``model`` run with the request's llama-server flags (the
        ``X-Corral-Flags`` header), or a 400 naming what is wrong with them."""
        raw = next((request.headers[h] for h in FLAG_HEADERS if h in request.headers), "")
        if not raw.strip():
            return model
        if self.host is None or self.host.resolve(model) is None:
            raise Refusal.of(
                400,
                "per-request llama-server flags (X-Corral-Flags) apply to models that "
                "`corral serve` starts; this model's servers are run by a remote agent",
            )
        try:
            flags = normalize_flags(raw)
        except RequestFlagError as exc:
            raise Refusal.of(400, str(exc)) from None
        key = self.host.flagged_key(model, flags)
        refused = self.host.refuse_flags(key)
        if refused is not None:
            raise Refusal.of(400, refused)
        return key

    @staticmethod
    def _unread_body(ex: Exchange, status: int, message: str) -> Refusal:
        """corral's error for a request whose body it will not read to the end: what is
        left of the body is dropped (aiohttp would linger reading it) and the connection
        closes after the answer."""
        ex.request.content.feed_eof()
        response = error_response(status, message)
        response.force_close()
        return Refusal(response)
