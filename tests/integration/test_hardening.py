"""Bad input at the front door: every class gets a clear OpenAI-shaped 4xx and loses
nothing; the same llama-server keeps serving afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.fleet import CHAT, MANAGEMENT_TOKEN, Fleet, start_fleet
from tests.support.serve_fake import TOKEN as SERVE_TOKEN
from tests.support.serve_fake import Serve, cleanup, start_serve
from tests.support.waiting import wait_for

__all__ = ["cleanup"]  # the fixture


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(buffered_request_timeout=5.0, api_keys=["right-key"])
    try:
        yield fleet
    finally:
        await fleet.close()


AUTH = {"Authorization": "Bearer right-key"}


async def post_raw(
    fleet: Fleet, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, str, dict[str, object] | None]:
    assert fleet.http is not None
    async with fleet.http.post(fleet.base + path, data=data, headers=headers) as response:
        content_type = response.content_type
        body = (
            await response.json(content_type=None) if content_type == "application/json" else None
        )
        return response.status, content_type, body


async def assert_still_serves(fleet: Fleet) -> None:
    status, body, _ = await fleet.post("/v1/chat/completions", {**CHAT, "model": "m"}, AUTH)
    assert status == 200, body


async def test_json_nested_a_hundred_thousand_deep_is_a_400(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=1)
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, content_type, body = await post_raw(
        fleet, "/v1/chat/completions", deep, {**AUTH, "Content-Type": "application/json"}
    )
    assert (status, content_type) == (400, "application/json")
    assert body is not None and "nested too deeply" in body["error"]["message"]  # type: ignore[index]
    await assert_still_serves(fleet)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_its_content_encoding_does_not_decode_is_a_400(
    fleet: Fleet, encoding: str
) -> None:
    await fleet.add_fake(model="m", slots=1)
    status, content_type, body = await post_raw(
        fleet,
        "/v1/chat/completions",
        b"this is not " + encoding.encode(),
        {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert (status, content_type) == (400, "application/json")
    assert body is not None
    assert "could not be read" in body["error"]["message"]  # type: ignore[index]
    assert body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    await assert_still_serves(fleet)


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_a_valid_encoded_body_reaches_llama_server_decoded(
    fleet: Fleet, encoding: str, encode: object
) -> None:
    """aiohttp decodes the body; corral forwards the plain bytes without the header
    (the fake, like llama-server, answers 415 to any Content-Encoding)."""
    node = await fleet.add_fake(model="m", slots=1)
    raw = json.dumps({**CHAT, "model": "m"}).encode()
    status, _, body = await post_raw(
        fleet,
        "/v1/chat/completions",
        encode(raw),  # type: ignore[operator]
        {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert status == 200, body
    assert node.fake.counters.requests_served >= 1


async def test_a_content_encoding_corral_does_not_decode_is_a_415(fleet: Fleet) -> None:
    await fleet.add_fake(model="m", slots=1)
    status, content_type, body = await post_raw(
        fleet,
        "/v1/chat/completions",
        b"\x00\x01compressed?",
        {**AUTH, "Content-Type": "application/json", "Content-Encoding": "compress"},
    )
    assert (status, content_type) == (415, "application/json")
    assert body is not None and "compress" in body["error"]["message"]  # type: ignore[index]
    await assert_still_serves(fleet)


async def raw_request(address: str, request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request`` as bytes (headers no client library would encode) and read the
    answer: status, head and body (the connection closes after it)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


@pytest.mark.parametrize(
    "header", [b"Authorization: Bearer \xff\xfe\xc3", b"x-api-key: \xff\xfe\xc3"]
)
async def test_a_key_that_is_not_utf8_is_a_401_on_inference_and_management(
    fleet: Fleet, header: bytes
) -> None:
    await fleet.add_fake(model="m", slots=1)
    addresses = fleet.balancer.addresses
    for address, path in (
        (addresses.inference, b"/v1/models"),
        (addresses.management, b"/api/v1/instances"),
    ):
        status, head, body = await raw_request(
            address,
            b"GET "
            + path
            + b" HTTP/1.1\r\nHost: x\r\n"
            + header
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert status == 401, (address, head, body)
        assert json.loads(body)["error"]["type"] == "authentication_error"
    assert fleet.http is not None
    async with fleet.http.get(
        fleet.management + "/api/v1/instances",
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
    ) as response:
        assert response.status == 200
    await assert_still_serves(fleet)


async def test_a_client_that_leaves_mid_stream_is_counted_as_499_without_a_traceback(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.add_fake(model="m", slots=2, token_delay=0.05, tokens=200)
    counted = fleet.balancer.metrics.requests.labels("m", "/v1/chat/completions", "499")
    assert fleet.http is not None
    caplog.set_level(logging.INFO)
    leaving = 5
    for _ in range(leaving):
        async with fleet.http.post(
            fleet.base + "/v1/chat/completions",
            json={**CHAT, "model": "m", "stream": True},
            headers=AUTH,
        ) as response:
            assert response.status == 200
            await response.content.readany()  # the first chunk, then hang up
    await wait_for(lambda: counted._value.get() == leaving, "every abandoned stream to be counted")
    access = [r.getMessage() for r in caplog.records if r.name == "corral.access"]
    assert sum("status=499" in line for line in access) == leaving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    await wait_for(
        lambda: all(i.in_flight == 0 for i in fleet.balancer.scheduler.fleet.instances.values()),
        "the slots to be free",
    )
    await assert_still_serves(fleet)


MALFORMED = [
    # bare LF line endings
    b"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\n"
    b"x-api-key: {key}\nContent-Length: 2\n\n{{}}",
    # a broken chunk size
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
    # Content-Length together with Transfer-Encoding
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # NUL in a header value, after the key
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Bad: a\x00b\r\n\r\n",
    # an unknown method
    b"BREW /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
    # a duplicate Content-Length
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
    b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}",
    # a 100 KB header
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Big: "
    + b"a" * 100_000
    + b"\r\n\r\n",
]


async def test_no_key_or_token_reaches_the_log_whatever_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleanup: list[Serve]
) -> None:
    api_key = "sk-corral-secret-api-key-0123456789"
    monkeypatch.setenv("CORRAL_API_KEYS", api_key)
    serve = await start_serve(tmp_path)
    cleanup.append(serve)
    inference = serve.base.removeprefix("http://")
    management = serve.management.removeprefix("http://")
    for address, secret in ((inference, api_key), (management, SERVE_TOKEN)):
        for template in MALFORMED:
            request = template.replace(b"{key}", secret.encode()).replace(b"{{}}", b"{}")
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await raw_request(address, request)
    # the malformed requests were logged (aiohttp logs them): the secrets are not
    await wait_for(lambda: "malformed request" in serve.log_path.read_text(), "the log")
    log_text = serve.log_path.read_text(errors="replace")
    assert api_key not in log_text
    assert SERVE_TOKEN not in log_text
    assert "[redacted]" in log_text


@pytest.mark.parametrize("template", MALFORMED)
async def test_parser_errors_are_openai_shaped_json_on_the_inference_port(
    fleet: Fleet, template: bytes
) -> None:
    await fleet.add_fake(model="m", slots=1)
    request = template.replace(b"{key}", b"right-key").replace(b"{{}}", b"{}")
    status, head, body = await raw_request(fleet.balancer.addresses.inference, request)
    assert status == 400, head
    assert b"application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("malformed HTTP request")
    await assert_still_serves(fleet)


async def test_slow_clients_are_cut_while_normal_traffic_keeps_flowing() -> None:
    fleet = await start_fleet(
        buffered_request_timeout=5.0, client_header_timeout=1.0, client_body_timeout=1.0
    )
    try:
        await fleet.add_fake(model="m", slots=4)
        host, port = fleet.balancer.addresses.inference.rsplit(":", 1)

        async def slow_headers() -> bytes:
            _, writer = await asyncio.open_connection(host, int(port))
            try:
                for byte in (
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
                ):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)
                return b"never cut"
            except ConnectionError:
                return b""
            finally:
                writer.close()

        async def slow_body() -> bytes:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10
                )
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 15)
            finally:
                writer.close()

        # the numbers: 50 slow heads (a byte every 100 ms), 100 short bodies
        cut_headers = [asyncio.ensure_future(slow_headers()) for _ in range(50)]
        cut_bodies = [asyncio.ensure_future(slow_body()) for _ in range(100)]
        for _ in range(5):  # meanwhile, ordinary requests are served
            status, body, _ = await fleet.chat("m")
            assert status == 200, body
        headers_outcomes = await asyncio.wait_for(asyncio.gather(*cut_headers), 30)
        assert headers_outcomes == [b""] * 50  # every slow head was cut before its end
        for answer in await asyncio.wait_for(asyncio.gather(*cut_bodies), 30):
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answer
            assert "client_body_timeout" in json.loads(body)["error"]["message"]
        status, body, _ = await fleet.chat("m")
        assert status == 200, body
    finally:
        await fleet.close()


async def test_connections_beyond_the_bound_get_a_503_and_are_closed() -> None:
    fleet = await start_fleet(buffered_request_timeout=5.0, max_client_connections=5)
    try:
        await fleet.add_fake(model="m", slots=1)
        host, port = fleet.balancer.addresses.inference.rsplit(":", 1)
        held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
        try:
            await wait_for(
                lambda: len(fleet.balancer._runners[0].server.connections) >= 5,  # type: ignore[union-attr]
                "the held connections to be open",
            )
            reader, writer = await asyncio.open_connection(host, int(port))
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer
            assert "max_client_connections" in json.loads(body)["error"]["message"]
        finally:
            for _, w in held:
                w.close()
        await wait_for(
            lambda: len(fleet.balancer._runners[0].server.connections) == 0,  # type: ignore[union-attr]
            "the held connections to close",
        )
        status, body, _ = await fleet.chat("m")
        assert status == 200, body
    finally:
        await fleet.close()
