"""aiohttp's own refusals on the management listener, in the OpenAI shape.

The handlers answer their errors with :func:`corral.gateway.errors.error_response`,
but some refusals never reach a handler: no route for the path (404), a method the
path does not take (405, with ``Allow``), a body over the size limit (413), a request
for the agents' WebSocket that is not an upgrade (400). aiohttp answers those in
plain text; this middleware gives them the one error shape every client of corral
reads, keeping the headers that say what to do (``Allow``, ``Retry-After``). A handler
that crashes is logged with its traceback and answered as an OpenAI-shaped 500, so
the client learns that the fault is corral's and where to look.

A stream (server-sent events) that fails after its headers went out cannot be answered
again: :func:`note_prepared` marks each request whose response was prepared, and its
failure is left to aiohttp, which cuts the connection, so the client sees the stream
break instead of a second response inside it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from aiohttp import web

from corral.gateway.errors import error_response

log = logging.getLogger(__name__)

#: Headers of aiohttp's refusals that a client needs to act on them.
KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")

#: Set by the middleware for the request it runs (its own task): whether the handler
#: has begun its answer.
_prepared: ContextVar[list[bool] | None] = ContextVar("corral_response_prepared", default=None)


async def note_prepared(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: this request's answer has begun."""
    begun = _prepared.get()
    if begun is not None:
        begun[0] = True


def _message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no management route {request.path}: see GET /api/v1/openapi.json"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}: use {allowed}"
    if exc.status == 413:
        return f"the request body is too large: {exc.text}"
    return exc.text or exc.reason


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    begun = [False]
    token = _prepared.set(begun)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json" or begun[0]:
            raise  # a redirect, a refusal that is OpenAI-shaped already, or too late
        headers = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
        return error_response(exc.status, _message(request, exc), headers=headers)
    except Exception:
        if begun[0]:
            raise  # a stream under way: aiohttp logs it and cuts the connection
        log.exception("management route failed method=%s path=%s", request.method, request.path)
        return error_response(
            500, "corral failed to answer this request: the balancer's log has the traceback"
        )
    finally:
        _prepared.reset(token)
