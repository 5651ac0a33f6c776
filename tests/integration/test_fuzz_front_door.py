"""Generated bodies, headers, paths and flags thrown at a running balancer (gateway and
management API) in front of the fake llama-server: no 5xx corral made itself, every
error corral gives on ``/v1/*`` is OpenAI-shaped JSON, and the same llama-server serves
a normal request afterwards. ``CORRAL_FUZZ_EXAMPLES`` raises the count for a long run."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corral.gateway.admission import MODEL_ROUTES
from tests.support.fleet import MANAGEMENT_TOKEN, Fleet, start_fleet

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "150"))
KEY = "fuzz-right-key"


@dataclass
class Running:
    loop: asyncio.AbstractEventLoop
    fleet: Fleet
    thread: threading.Thread

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Fleet:
        fleet = await start_fleet(
            buffered_request_timeout=2.0, api_keys=[KEY], client_body_timeout=5.0
        )
        await fleet.add_fake(model="m", slots=4)
        return fleet

    fleet = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    yield Running(loop, fleet, thread)
    asyncio.run_coroutine_threadsafe(fleet.close(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


# header values http.client will send: no CR, LF or NUL; latin-1 so bytes >= 0x80 occur
_header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
)
_keys = st.sampled_from([f"Bearer {KEY}", "Bearer wrong", "", f"bearer {KEY}"]) | _header_text
_flags = st.sampled_from(
    ["-np 512", "-c -5", "--temp 0.5", "-c 99999999999999999999999", "--model /etc/passwd",
     "-fa", "--seed=-1 -np 2", "'unclosed", "--host 0.0.0.0", "-c 1e9"]
) | _header_text  # fmt: skip
_headers = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": _keys,
        "x-api-key": _keys,
        "X-Corral-Flags": _flags,
        "X-Model-Id": st.sampled_from(["m", "nope", "m+deadbeef", "../m"]) | _header_text,
        "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data"]),
        "X-Corral-Loading-Notices": _header_text,
        "X-Session-Id": _header_text,
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "zstd", "compress", "x"]),
    },
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_chat = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "nope", ""]) | _json,
        "messages": st.just([{"role": "user", "content": "hi"}]) | _json,
        "stream": st.booleans() | _json,
        "prompt": st.text(max_size=30) | _json,
        "max_tokens": st.integers(-5, 50) | _json,
        "id_slot": st.integers(-3, 10),
    },
)
_body = (
    _chat.map(lambda d: json.dumps(d, allow_nan=True).encode())
    | _json.map(lambda v: json.dumps(v, allow_nan=True).encode())
    | st.binary(max_size=300)
)
_inference_paths = st.sampled_from(
    [*MODEL_ROUTES, "/v1/models", "/health", "/props", "/slots", "/models/sse", "/"]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-%", max_size=30).map(
    lambda p: "/" + p
)
_management_paths = st.sampled_from(
    ["/api/v1/instances", "/api/v1/agents", "/api/v1/models", "/api/v1/models/m/load",
     "/api/v1/config/reload", "/metrics", "/api/v1/instances/x/restart", "/"]
)  # fmt: skip
_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])


def send(address: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value.encode("latin-1"))
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        if (response.getheader("Content-Type") or "").startswith("text/event-stream"):
            # an event stream that stays open by design (/models/sse): its head says
            # what it is; reading to its end would wait forever
            return response.status, dict(response.getheaders()), b""
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def check(status: int, headers: dict[str, str], data: bytes, path: str, method: str) -> None:
    relayed = "X-Corral-Instance" in headers  # llama-server's answer, passed on
    if relayed:
        return
    # 501: a route switched off (the /slots aggregate), as llama-server answers it
    assert status < 500 or status == 501, (status, data[:300])
    if path.startswith("/v1/") and status >= 400 and method != "HEAD":
        assert headers.get("Content-Type", "").startswith("application/json"), (status, data)
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and isinstance(error["code"], int)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=_methods, path=_inference_paths, headers=_headers, body=_body)
@example(
    method="GET", path="/models/sse", headers={"Authorization": f"Bearer {KEY}"}, body=b""
)  # an event stream that stays open: see send
def test_generated_requests_to_the_gateway_get_no_5xx_of_corral_s_own(
    running: Running, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    address = running.fleet.balancer.addresses.inference
    check(*send(address, method, path, headers, body), path, method)


@settings(
    max_examples=max(20, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=_methods,
    path=_management_paths,
    authorized=st.booleans(),
    headers=_headers,
    body=_body,
)
def test_generated_requests_to_the_management_api_get_no_5xx(
    running: Running,
    method: str,
    path: str,
    authorized: bool,
    headers: dict[str, str],
    body: bytes,
) -> None:
    if authorized:
        headers = {**headers, "Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
        headers.pop("x-api-key", None)
    status, _, data = send(running.fleet.balancer.addresses.management, method, path, headers, body)
    # 501: an action this balancer does not have (model loads need a model host)
    assert status < 500 or status == 501, (status, data[:300])


def test_after_the_fuzz_the_same_llama_server_still_serves(running: Running) -> None:
    """Runs after the generated requests (pytest keeps file order)."""
    assert running.thread.is_alive()
    fleet = running.fleet
    (node,) = fleet.nodes
    served = node.fake.counters.requests_served
    status, body, _ = running.call(
        fleet.post(
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            {"Authorization": f"Bearer {KEY}"},
        )
    )
    assert status == 200, body
    assert node.fake.counters.requests_served == served + 1
    assert len(fleet.balancer.scheduler.fleet.instances) == 1
