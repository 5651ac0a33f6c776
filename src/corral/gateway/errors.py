"""OpenAI-shaped errors: every error a client sees has this one shape."""

from __future__ import annotations

import json

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    415: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_supported_error",
    502: "upstream_error",
    503: "unavailable_error",
    504: "timeout_error",
}


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, object]:
    return {
        "error": {
            "code": status,
            "message": message,
            "type": error_type or _TYPES.get(status, "server_error"),
        }
    }


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(error_body(status, message, error_type)).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(status: int, message: str, error_type: str | None = None) -> bytes:
    """The event that ends a stream which failed after its first byte."""
    return b"data: " + json.dumps(error_body(status, message, error_type)).encode() + b"\n\n"
