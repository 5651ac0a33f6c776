"""Connection-level limits and errors for corral's HTTP servers, below the app.

aiohttp bounds a request's line, headers and body size, but not the time a client may
take to send them, nor how many connections may be open; and the errors its parser
answers (a bad chunk size, Content-Length with Transfer-Encoding, a NUL in a header, an
unknown method) are text/plain. :class:`GuardedServer` (installed by
:class:`GuardedAppRunner`) makes one request handler
per connection that:

- closes a connection that has not sent a complete request head within
  ``header_timeout`` seconds of opening or of its last response (slow headers, and an
  idle keep-alive connection, are cut alike);
- refuses a connection beyond ``max_connections`` open ones with a 503 in the OpenAI
  error shape, and closes it;
- answers parser errors in the OpenAI error shape (JSON) instead of aiohttp's text, and
  logs them at WARNING without a traceback (the log filter in
  :mod:`corral.observe.redact` keeps any key in the request's bytes out of the line).

The body's own timeout lives in the gateway (``request.read()`` bounded by
``body_timeout``), where it can answer 408 with a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from corral.gateway.errors import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 30.0
    """Seconds a connection has to send a complete request head (from its opening or
    its last response)."""
    max_connections: int = 4096
    """Client connections open at once; more are answered 503 and closed."""


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler with a request-head deadline and JSON parser errors."""

    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self.limits.max_connections:
            body = json.dumps(
                error_body(
                    503,
                    f"too many open connections ({self.limits.max_connections}, "
                    "max_client_connections); retry shortly",
                )
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            ).encode()
            log.warning("connection refused: %d open", len(manager.connections))
            writable = transport  # a stream transport: write, then close
            writable.write(head + body)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._await_head()

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self._loop.call_later(self.limits.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        # idle (waiting for a request head, complete or not): close. A request being
        # handled, or one queued, has its head already.
        if self._waiter is not None and not self._waiter.done() and not self._messages:
            log.info(
                "closing a connection that sent no complete request head in %g s",
                self.limits.header_timeout,
            )
            self.force_close()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None
        super().connection_lost(exc)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self.transport is not None and not self._force_close:
            self._await_head()  # the next request's head is due within header_timeout
        return result

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        log.warning("malformed request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent; cannot send the parser's error")
        reason = (message or str(exc) or "malformed request").strip().splitlines()[0]
        response = web.Response(
            status=status,
            body=json.dumps(error_body(status, f"malformed HTTP request: {reason[:200]}")).encode(),
            content_type="application/json",
        )
        response.force_close()
        return response


class GuardedServer(Server):
    """Makes :class:`GuardedRequestHandler` handlers (``handler_class``)."""

    handler_class: type[GuardedRequestHandler]

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose server is a :class:`GuardedServer`."""

    __slots__ = ("_handler_class",)

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._handler_class = type(
            "GuardedRequestHandler", (GuardedRequestHandler,), {"limits": limits}
        )

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer
        server.handler_class = self._handler_class  # type: ignore[attr-defined]
        return server
