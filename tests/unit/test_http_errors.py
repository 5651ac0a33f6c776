"""The management listener's refusals that no handler writes, in the OpenAI shape."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from corral.control.http_errors import note_prepared, openai_errors


async def _answer(exc: BaseException, method: str = "GET") -> web.Response:
    request = make_mocked_request(method, "/api/v1/somewhere")

    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    response = await openai_errors(request, handler)
    assert isinstance(response, web.Response) and response.content_type == "application/json"
    return response


def _error(response: web.Response) -> dict[str, object]:
    assert isinstance(response.body, bytes)
    error: dict[str, object] = json.loads(response.body)["error"]
    assert error["code"] == response.status
    return error


async def test_no_route_is_an_openai_404_pointing_at_the_description() -> None:
    response = await _answer(web.HTTPNotFound())
    assert response.status == 404
    assert "/api/v1/openapi.json" in str(_error(response)["message"])


async def test_a_method_the_route_does_not_take_is_a_405_that_keeps_allow() -> None:
    response = await _answer(web.HTTPMethodNotAllowed("PATCH", ["GET"]), "PATCH")
    assert response.status == 405 and response.headers["Allow"] == "GET"
    assert _error(response)["message"] == "PATCH is not allowed on /api/v1/somewhere: use GET"


async def test_a_crashing_handler_is_an_openai_500_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await _answer(KeyError("oops"))
    assert response.status == 500 and _error(response)["type"] == "server_error"
    assert "management route failed" in caplog.text and "KeyError" in caplog.text


async def test_an_openai_shaped_refusal_passes_through_untouched() -> None:
    already = web.HTTPNotImplemented(text='{"error": {}}', content_type="application/json")
    request = make_mocked_request("GET", "/x")

    async def handler(request: web.Request) -> web.StreamResponse:
        raise already

    with pytest.raises(web.HTTPNotImplemented):
        await openai_errors(request, handler)


async def test_a_stream_that_fails_after_its_headers_is_left_to_aiohttp_to_cut() -> None:
    request = make_mocked_request("GET", "/api/v1/events")

    async def handler(request: web.Request) -> web.StreamResponse:
        await note_prepared(request, web.StreamResponse())  # what prepare() signals
        raise ConnectionError("upstream of the stream went away")

    with pytest.raises(ConnectionError):
        await openai_errors(request, handler)
