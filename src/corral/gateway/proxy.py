"""The inference front door: the app, and the relay from a lease to the client.

The request path, top to bottom:

1. :mod:`corral.gateway.admission`: the API key (in front of every route but
   ``/health``: :meth:`Gateway.route`), then the body, the model, its settings,
   flags and filters, the placement: an :class:`~corral.gateway.exchange.Exchange`,
   or corral's refusal;
2. :meth:`Gateway._relay` (here): a slot lease from the scheduler (buffering if
   needed), one upstream request (:mod:`corral.gateway.upstream`), resent elsewhere
   when the upstream fails before the first byte reaches the client (the lease is
   returned as failed, so the instance's circuit breaker opens);
3. :meth:`Gateway._stream` (here): the response relayed chunk by chunk as it arrives;
   after the first byte, a failure ends a stream with an OpenAI-shaped error event;
4. :mod:`corral.gateway.accounting`: the response counted and logged, its token usage
   learned from; the lease releases itself when the response ends or the client goes
   away, carrying the cache feedback to the policy.

A streaming chat request that waits for its model may get loading notices first
(:mod:`corral.gateway.notices`): then the SSE headers go out before any upstream
answers, and every later failure is an error event in that stream. The front door's
own answers (``/health``, ``/v1/models``, the slots aggregate) are in
:mod:`corral.gateway.listing`, router mode's routes for the web UI in
:mod:`corral.gateway.webui`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from corral.gateway.accounting import CLIENT_GONE, RECORDED, Accounting, ResponseTail, TokenUsage
from corral.gateway.admission import MODEL_ROUTES, Admission, Handler
from corral.gateway.errors import error_response, sse_error_event
from corral.gateway.exchange import Exchange
from corral.gateway.listing import ListingRoutes
from corral.gateway.notices import LoadingNotices
from corral.gateway.options import GatewayOptions
from corral.gateway.upstream import (
    INSTANCE_HEADER,
    RESPONSE_DROP,
    IdleWatch,
    Upstream,
    UpstreamFailed,
    UpstreamOptions,
)
from corral.gateway.webui import WebUIRoutes
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.scheduling.policies import Placement
from corral.scheduling.scheduler import Lease, Scheduler, SchedulingError, UnknownInstance

if TYPE_CHECKING:
    from corral.hosting import Host

log = logging.getLogger(__name__)


class Gateway:
    """The inference HTTP app; see the module doc."""

    def __init__(
        self, scheduler: Scheduler, metrics: BalancerMetrics, options: GatewayOptions
    ) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.options = options
        self.accounting = Accounting(metrics, learns=scheduler.learns)
        self.admission = Admission(scheduler, options, self.accounting)
        self.upstream = Upstream(
            UpstreamOptions(
                api_keys=tuple(options.api_keys),
                upstream_api_key=options.upstream_api_key,
                connect_timeout=options.connect_timeout,
                first_byte_timeout=options.first_byte_timeout,
                tls=options.upstream_tls,
            ),
            metrics,
        )
        self.app = web.Application(client_max_size=options.max_body)
        self.listing = ListingRoutes(self)
        """The front door's own answers: ``/health``, ``/v1/models``, the slots aggregate."""
        for route in MODEL_ROUTES:
            self.route("POST", route, self.forward)
        self.webui = WebUIRoutes(self)
        """Router mode's routes for llama-server's web UI (``/props``, ``/models/sse``)."""
        # paths corral doesn't route by model (the web UI's page, /slots, /props...) go
        # to the default model, or, when several are served and the request names
        # none, to any ready instance (every llama-server serves the same web UI),
        # starting the first listed model when none is ready
        self.route("*", "/{tail:.*}", self.forward)
        self.app.on_startup.append(self.upstream.start)
        self.app.on_cleanup.append(self.upstream.stop)
        self.app.on_response_prepare.append(self.admission.cors_headers)

    def route(self, method: str, path: str, handler: Handler, *, public: bool = False) -> None:
        """Add a route to the front door: behind the API key unless ``public`` (only
        the health check is: a load balancer's or orchestrator's probe, as llama-server's
        own ``/health`` is public). Without ``api_keys`` (they are fixed at start) there
        is no key to check, and no guard in the way."""
        keyed = bool(self.options.api_keys) and not public
        guarded = self.admission.guarded(handler) if keyed else handler
        if method == "GET":
            self.app.router.add_get(path, guarded)  # and HEAD, as aiohttp's add_get does
        else:
            self.app.router.add_route(method, path, guarded)

    @property
    def host(self) -> Host | None:
        """The local model host (``corral serve``): /v1/models lists its catalog too."""
        return self.admission.host

    @host.setter
    def host(self, host: Host | None) -> None:
        self.admission.host = host

    @property
    def traffic(self) -> RecentTraffic | None:
        """Recent traffic per model for the dashboard, when the balancer keeps it."""
        return self.accounting.traffic

    @traffic.setter
    def traffic(self, traffic: RecentTraffic | None) -> None:
        self.accounting.traffic = traffic

    # -- forwarding ----------------------------------------------------------------------

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Admission (:mod:`corral.gateway.admission`), then :meth:`_relay`."""
        ex = await self.admission.admit(request)
        if not isinstance(ex, Exchange):
            return ex  # refused, and counted
        try:
            return await self._relay(ex)
        except asyncio.CancelledError:
            # the client left before its response began (in the buffer, say)
            if not request.get(RECORDED):
                ex.instance, ex.waited = "", 0.0
                self.accounting.record(ex, CLIENT_GONE)
            raise
        except SchedulingError as exc:
            ex.instance, ex.waited = "", 0.0  # no instance answered: logged as none
            return self.accounting.finish(
                error_response(exc.status, exc.message, exc.error_type, exc.headers), ex
            )
        finally:
            if ex.notices is not None:
                ex.notices.close()

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

    async def _relay(self, ex: Exchange) -> web.StreamResponse:
        """Lease, send, retry elsewhere before the first byte, then :meth:`_stream`."""
        assert ex.placement is not None
        model, notices = ex.model, ex.notices
        exclude: set[str] = set()
        headers = self.upstream.headers(ex.request, ex.request_id)
        failures: list[str] = []
        trace = ex.trace
        while True:
            trace.waiting()
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
            trace.granted(lease, self.scheduler.policy.name)
            with lease:  # released on leaving, as lease.outcome says (client_gone unless set)
                if noticed and notices is not None:
                    await notices.ready(lease.waited)
                try:
                    upstream, first = await self.upstream.open(
                        ex.request, ex.body, lease, trace.sending(headers), trace
                    )
                except UpstreamFailed as exc:
                    trace.failed(str(exc))
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
            return self.accounting.finish(error_response(status, message, error_type), ex)
        await notices.fail(status, message, error_type)
        self.accounting.record(ex, status)
        return notices.response

    async def _stream(
        self, ex: Exchange, upstream: aiohttp.ClientResponse, first: bytes, lease: Lease
    ) -> web.StreamResponse:
        """Relay the instance's answer chunk by chunk, then record it and learn from it."""
        request, notices = ex.request, ex.notices
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
            response.headers[INSTANCE_HEADER] = lease.instance.id
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
                        self.accounting.record(ex, 502, ttft)
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
            self.accounting.record(ex, status, ttft, usage)
            if usage.generated is not None:
                self.accounting.learn(usage, lease, ex)
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
        self.accounting.record(ex, response.status, ttft, usage)
        if response.status == 200:
            self.accounting.learn(usage, lease, ex)
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
        self.accounting.record(ex, status)
        return response
