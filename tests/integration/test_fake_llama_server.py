"""The fake llama-server answers like the real one and fails on demand.

Process-level behaviour (readiness, exit mid-stream, signals, refused connections) is
proven against the fake started as a real subprocess; the rest in-process through
aiohttp's test server. Nothing sleeps a fixed time: every wait is on a condition with a
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from corral.testing.fake_llama_server import (
    EXIT_AFTER_TOKENS,
    SERVER_KEY,
    FakeLlamaServer,
    FakeOptions,
    build_app,
    main,
)

WAIT_S = 20.0
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
CHAT = {"messages": [{"role": "user", "content": "hello there my friend"}]}


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` until true; fail after WAIT_S with ``what`` in the message."""
    async with asyncio.timeout(WAIT_S):
        while not await condition():  # noqa: ASYNC110 - the condition is an HTTP answer
            await asyncio.sleep(0.01)
    assert await condition(), what


def data_lines(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        line.removeprefix("data: ")
        for line in raw.decode().split("\n\n")
        if line.startswith("data: ")
    ]


# ------------------------------------------------------------------- fixtures
Client = TestClient[Any, Any]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Start in-process fakes; each client gets a fresh connection per request."""
    clients: list[Client] = []

    async def make(**options: Any) -> Client:
        client: Client = TestClient(
            TestServer(build_app(FakeOptions(**options))),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def fake_of(client: Client) -> FakeLlamaServer:
    return client.app[SERVER_KEY]


@dataclass
class FakeProcess:
    proc: asyncio.subprocess.Process
    url: str
    port: int


@pytest.fixture
async def start_fake(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[FakeProcess]]]:
    """Start the fake as a real process with ``--port 0``; every one is killed at the end."""
    started: list[asyncio.subprocess.Process] = []
    with contextlib.ExitStack() as stack:

        async def start(*args: str) -> FakeProcess:
            log_file = stack.enter_context((tmp_path / f"fake-{len(started)}.log").open("wb"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.testing.fake_llama_server",
                "--port",
                "0",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
            started.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
            match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line.decode())
            assert match, f"unexpected first line {line!r}"
            return FakeProcess(proc, match[1], int(match[2]))

        try:
            yield start
        finally:
            for proc in started:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A session that opens a new connection per request (llama-server closes streams')."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def health_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/health") as resp:
        return resp.status


# ------------------------------------------------------------ readiness (process)
async def test_process_prints_its_port_and_names_itself_by_it(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake()
    async with http.get(fake.url + "/health") as resp:
        assert resp.status == 200
        assert resp.headers["X-Fake-Instance"] == str(fake.port)


async def test_health_is_503_while_loading_then_200(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake("--load-delay", "3")
    async with http.get(fake.url + "/health") as resp:
        assert resp.status == 503
        assert await resp.json() == LOADING

    async def ready() -> bool:
        return await health_status(http, fake.url) == 200

    await wait_until(ready, "fake never became ready")
    async with http.get(fake.url + "/health") as resp:
        assert await resp.json() == {"status": "ok"}


async def test_other_endpoints_answer_503_while_loading(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(load_delay=3600, api_keys=("secret",))
    for method, path in [
        ("GET", "/props"),
        ("GET", "/slots"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/completion"),
        ("POST", "/v1/embeddings"),
    ]:
        # no API key given: loading is answered first, as llama-server does
        async with client.request(method, path, json=CHAT) as resp:
            assert resp.status == 503, path
            assert await resp.json() == LOADING
    async with client.get("/_fake/state") as resp:
        assert (await resp.json())["ready"] is False


# ------------------------------------------------------------------- shapes
async def test_props_report_slots_model_and_context(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=3, ctx_size=3000, model="m1")
    async with client.get("/props") as resp:
        props = await resp.json()
    assert props["total_slots"] == 3
    assert props["model_alias"] == "m1"
    assert props["model_path"] == "m1"
    assert props["default_generation_settings"]["n_ctx"] == 1000
    assert isinstance(props["default_generation_settings"]["params"]["temperature"], float)
    assert props["is_sleeping"] is False
    assert set(props["modalities"]) == {"vision", "video", "audio"}
    assert "<|im_start|>" in props["chat_template"]
    assert isinstance(props["build_info"], str)


async def test_models_list_the_model_in_openai_and_ollama_shape(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(model="m1")
    for path in ("/v1/models", "/models"):
        async with client.get(path) as resp:
            body = await resp.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["m1"]
        assert body["data"][0]["owned_by"] == "llamacpp"
        assert [m["name"] for m in body["models"]] == ["m1"]


async def test_slots_list_one_entry_per_slot_with_llama_server_keys(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=2, ctx_size=2048)
    async with client.get("/slots") as resp:
        slots = await resp.json()
    assert slots == [
        {"id": 0, "n_ctx": 1024, "speculative": False, "is_processing": False},
        {"id": 1, "n_ctx": 1024, "speculative": False, "is_processing": False},
    ]
    async with client.post("/completion", json={"prompt": "a b c", "id_slot": 1}) as resp:
        assert resp.status == 200
    async with client.get("/slots") as resp:
        slot = (await resp.json())[1]
    assert {"id_task", "n_prompt_tokens", "params", "next_token"} <= set(slot)
    assert slot["next_token"][0]["n_decoded"] == 8


async def test_unknown_path_gets_404_json(make_client: Callable[..., Awaitable[Client]]) -> None:
    client = await make_client()
    async with client.get("/no/such/path") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"


async def test_in_process_fake_names_itself_by_its_port(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    async with client.get("/health") as resp:
        assert resp.headers["X-Fake-Instance"] == str(client.port)


async def test_every_response_names_its_instance(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(name="alpha", load_delay=3600)
    async with client.get("/health") as resp:
        assert resp.status == 503
        assert resp.headers["X-Fake-Instance"] == "alpha"
    fake_of(client).options.load_delay = 0
    for path in ("/health", "/props", "/slots", "/nowhere"):
        async with client.get(path) as resp:
            assert resp.headers["X-Fake-Instance"] == "alpha", path
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.headers["X-Fake-Instance"] == "alpha"
        await resp.read()


# --------------------------------------------------------------- completions
async def test_chat_completion_answers_in_openai_shape_with_timings(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=5, model="m1")
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m1"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5
    assert body["timings"]["predicted_n"] == 5
    assert body["timings"]["prompt_n"] == body["usage"]["prompt_tokens"]


async def test_streaming_chat_sends_one_chunk_per_token_then_done(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=5)
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/chat/completions", json=request) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        lines = data_lines(await resp.read())
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert len(contents) == 5 and all(contents)
    assert chunks[6]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[7]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["timings"]["predicted_n"] == 5
    assert len(chunks) == 8


async def test_streaming_chat_without_include_usage_puts_timings_on_finish_chunk(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=2)
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        lines = data_lines(await resp.read())
    last = json.loads(lines[-2])
    assert "usage" not in last
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["timings"]["predicted_n"] == 2


async def test_max_tokens_caps_generation_and_finishes_with_length(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=8)
    async with client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}) as resp:
        body = await resp.json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"
    async with client.post("/completion", json={"prompt": "x", "n_predict": 2}) as resp:
        body = await resp.json()
    assert body["tokens_predicted"] == 2
    assert body["stop_type"] == "limit"
    assert body["generation_settings"]["n_predict"] == 2


async def test_native_completion_answers_in_llama_cpp_shape(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=3)
    async with client.post("/completion", json={"prompt": "one two three"}) as resp:
        body = await resp.json()
    assert body["stop"] is True
    assert body["tokens_evaluated"] == 3
    assert body["tokens_predicted"] == 3
    assert body["prompt"] == "one two three"
    assert body["stop_type"] == "eos"
    assert set(body["timings"]) >= {"cache_n", "prompt_n", "predicted_n", "predicted_ms"}


async def test_streaming_native_completion_has_no_done_marker(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=3)
    async with client.post("/completion", json={"prompt": "a b", "stream": True}) as resp:
        chunks = [json.loads(line) for line in data_lines(await resp.read())]
    assert [c["stop"] for c in chunks] == [False, False, False, True]
    assert [c["tokens_predicted"] for c in chunks] == [1, 2, 3, 3]
    assert chunks[-1]["content"] == ""
    assert chunks[-1]["timings"]["predicted_n"] == 3


async def test_streaming_oai_completion_ends_with_usage_and_done(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=2)
    async with client.post("/v1/completions", json={"prompt": "a b", "stream": True}) as resp:
        lines = data_lines(await resp.read())
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["object"] == "text_completion" for c in chunks)


async def test_oai_completion_answers_text_completion(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=2)
    async with client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 1}) as resp:
        body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "completion_tokens": 1,
        "prompt_tokens": 2,
        "total_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_openai_client_chats_and_streams_with_the_fake(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=4, model="m1")
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused")
    try:
        completion = await api.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        pieces = []
        stream = await api.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) == 4
        models = await api.models.list()
        assert [m.id for m in models.data] == ["m1"]
    finally:
        await api.close()


# ---------------------------------------------------------------- prefix cache
async def test_second_request_with_same_prefix_reports_cached_tokens(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        first = await resp.json()
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        second = await resp.json()
    n_prompt = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["timings"]["cache_n"] == 0
    # like llama-server, the last prompt token is always evaluated again
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert second["timings"]["cache_n"] == n_prompt - 1
    assert second["timings"]["prompt_n"] == 1


async def test_follow_up_turn_hits_the_cache_past_the_previous_answer(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=4)
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        first = await resp.json()
    answer = first["choices"][0]["message"]
    follow_up = {"messages": [*CHAT["messages"], answer, {"role": "user", "content": "more"}]}
    async with client.post("/v1/chat/completions", json=follow_up) as resp:
        second = await resp.json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > first["usage"]["prompt_tokens"]


async def test_cache_prompt_false_reports_no_cached_tokens(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    request = {"prompt": "a b c d", "cache_prompt": False}
    for _ in range(2):
        async with client.post("/completion", json=request) as resp:
            body = await resp.json()
    assert body["timings"]["cache_n"] == 0


async def test_id_slot_pins_the_request_to_that_slot(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=3)
    for id_slot in (2, 0, 1):
        async with client.post("/completion", json={"prompt": "x", "id_slot": id_slot}) as resp:
            assert (await resp.json())["id_slot"] == id_slot


async def test_request_goes_to_the_idle_slot_holding_its_prefix(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=2)
    prompts = ["alpha beta gamma delta epsilon", "one two three four five"]
    for id_slot, prompt in enumerate(prompts):
        async with client.post("/completion", json={"prompt": prompt, "id_slot": id_slot}) as resp:
            assert resp.status == 200
    for id_slot, prompt in enumerate(prompts):
        async with client.post("/completion", json={"prompt": prompt + " more"}) as resp:
            body = await resp.json()
        assert body["id_slot"] == id_slot
        assert body["timings"]["cache_n"] == 5


# ------------------------------------------------------------ slots and waiting
async def test_slots_show_processing_during_request(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=2, tokens=100_000, token_delay=0.01)
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.content.readline()  # the stream has begun: the slot is taken
        async with client.get("/slots") as slots_resp:
            processing = [s["is_processing"] for s in await slots_resp.json()]
        assert processing.count(True) == 1
        async with client.get("/metrics") as metrics_resp:
            assert "llamacpp:requests_processing 1\n" in await metrics_resp.text()
    # the client left mid-stream: the slot must come free again

    async def all_idle() -> bool:
        async with client.get("/slots") as r:
            return not any(s["is_processing"] for s in await r.json())

    await wait_until(all_idle, "slot stayed busy after the client left")


async def test_fail_on_no_slot_gives_503_when_all_slots_busy(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=1, tokens=100_000, token_delay=0.01)
    async with client.get("/slots?fail_on_no_slot=1") as resp:
        assert resp.status == 200
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as stream:
        await stream.content.readline()
        async with client.get("/slots?fail_on_no_slot=1") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == {
                "code": 503,
                "message": "no slot available",
                "type": "unavailable_error",
            }


async def test_request_waits_for_a_slot_when_all_are_busy(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=1, tokens=100_000, token_delay=0.01)
    fake = fake_of(client)
    first = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await first.content.readline()
    waiting = asyncio.create_task(
        client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    )

    async def deferred() -> bool:
        return fake.counters.deferred == 1

    await wait_until(deferred, "second request was not deferred")
    async with client.get("/metrics") as resp:
        assert "llamacpp:requests_deferred 1\n" in await resp.text()
    assert not waiting.done()
    first.close()  # the first client leaves; its slot frees and the waiter gets it
    second = await asyncio.wait_for(waiting, WAIT_S)
    assert second.status == 200
    assert (await second.json())["usage"]["completion_tokens"] == 2
    second.release()


async def test_state_counts_requests_and_max_concurrency(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(slots=2, tokens=100_000, token_delay=0.01)
    fake = fake_of(client)
    streams = [
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}) for _ in range(2)
    ]
    for s in streams:
        await s.content.readline()
    third = asyncio.create_task(client.post("/completion", json={"prompt": "x", "n_predict": 1}))

    async def three_in_flight() -> bool:
        return fake.counters.in_flight == 3

    await wait_until(three_in_flight, "third request never in flight")
    for s in streams:
        s.close()
    (await asyncio.wait_for(third, WAIT_S)).release()

    async def settled() -> bool:
        return fake.counters.in_flight == 0

    await wait_until(settled, "requests never finished")
    async with client.get("/_fake/state") as resp:
        state = await resp.json()
    assert state["max_in_flight"] == 3
    assert state["requests_served"] == 1
    assert state["requests_failed"] == 2  # the two streams whose clients left
    assert state["in_flight"] == 0


# ---------------------------------------------------------------- embeddings
async def test_embeddings_are_deterministic_unit_vectors_in_openai_shape(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(n_embd=16, model="m1")
    request = {"input": ["hello world", "other text", "hello world"]}
    async with client.post("/v1/embeddings", json=request) as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert body["model"] == "m1"
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert all(len(v) == 16 for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]


async def test_native_embedding_answers_a_list_of_vectors(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(n_embd=8)
    async with client.post("/embedding", json={"content": "hello"}) as resp:
        body = await resp.json()
    assert len(body) == 1
    assert body[0]["index"] == 0
    assert len(body[0]["embedding"][0]) == 8


async def test_embeddings_disabled_answer_501(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(embeddings=False)
    async with client.post("/v1/embeddings", json={"input": "x"}) as resp:
        assert resp.status == 501
        assert (await resp.json())["error"]["type"] == "not_supported_error"


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/completion", "/v1/embeddings"]
)
async def test_bad_json_gets_400_openai_error(
    make_client: Callable[..., Awaitable[Client]], path: str
) -> None:
    client = await make_client()
    async with client.post(path, data=b"{not json") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/chat/completions", {}, "'messages' is required"),
        ("/v1/chat/completions", {"messages": "x"}, "Expected 'messages' to be an array"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user"}]},
            "All non-assistant messages must contain 'content'",
        ),
        ("/completion", {}, "key 'prompt' not found"),
        ("/v1/embeddings", {}, '"input" or "content" must be provided'),
        ("/v1/embeddings", {"input": []}, '"input" must not be empty'),
    ],
)
async def test_missing_fields_get_400_with_llama_server_messages(
    make_client: Callable[..., Awaitable[Client]], path: str, body: Any, message: str
) -> None:
    client = await make_client()
    async with client.post(path, json=body) as resp:
        assert resp.status == 400
        assert message in (await resp.json())["error"]["message"]


async def test_prompt_longer_than_context_gets_400(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(ctx_size=10)
    async with client.post("/completion", json={"prompt": "w " * 20}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "exceed_context_size_error"
    assert error["n_prompt_tokens"] == 20
    assert error["n_ctx"] == 10


async def test_wrong_api_key_gets_401_but_health_stays_public(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(api_keys=("k1", "k2"))
    async with client.get("/health") as resp:
        assert resp.status == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Api-Key": "k3"}):
        async with client.get("/props", headers=headers) as resp:
            assert resp.status == 401
            assert await resp.json() == {
                "error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}
            }
    for headers in ({"Authorization": "Bearer k1"}, {"X-Api-Key": "k2"}):
        async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 200


async def test_tokenize_and_detokenize_round_trip_words(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    async with client.post("/tokenize", json={"content": "hello big world"}) as resp:
        tokens = (await resp.json())["tokens"]
    assert len(tokens) == 3 and all(isinstance(t, int) for t in tokens)
    async with client.post("/tokenize", json={"content": "hi", "with_pieces": True}) as resp:
        assert (await resp.json())["tokens"][0]["piece"] == "hi"
    async with client.post("/detokenize", json={"tokens": tokens}) as resp:
        assert (await resp.json())["content"] == "hello big world"


async def test_metrics_count_prompt_and_generated_tokens(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(tokens=3)
    async with client.post("/completion", json={"prompt": "a b c d"}) as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:
        text = await resp.text()
    assert "llamacpp:prompt_tokens_total 4\n" in text
    assert "llamacpp:tokens_predicted_total 3\n" in text
    assert "# TYPE llamacpp:requests_processing gauge" in text


async def test_metrics_and_slots_can_be_switched_off_like_llama_server(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(metrics=False, slots_endpoint=False)
    for path in ("/metrics", "/slots"):
        async with client.get(path) as resp:
            assert resp.status == 501, path


# ------------------------------------------------------------ faults in-process
async def test_http_500_fault_answers_server_error_then_recovers_after_count(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    async with client.post("/_fake/fault", json={"fault": "http-500", "count": 2}) as resp:
        assert resp.status == 200
    for _ in range(2):
        async with client.post("/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["type"] == "server_error"
    async with client.post("/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    async with client.get("/_fake/state") as resp:
        assert (await resp.json())["fault"] == "none"


async def test_hang_fault_accepts_and_never_answers_until_the_client_leaves(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(fault="hang")
    fake = fake_of(client)
    hung = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))

    async def accepted() -> bool:
        return fake.counters.in_flight == 1

    await wait_until(accepted, "hung request never arrived")
    async with client.get("/health") as resp:  # plain hang leaves health alone
        assert resp.status == 200
    assert not hung.done()
    hung.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await hung

    async def released() -> bool:
        return fake.counters.in_flight == 0

    await wait_until(released, "hung request kept after its client left")


async def test_hang_all_fault_hangs_health_too(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    fake = fake_of(client)
    async with client.post("/_fake/fault", json={"fault": "hang-all", "count": 1}) as resp:
        assert resp.status == 200
    hung = asyncio.create_task(client.get("/health"))

    async def fault_used() -> bool:
        return fake.fault_remaining is None and fake.counters.requests_total == 1

    await wait_until(fault_used, "health request never arrived")
    assert not hung.done()
    hung.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await hung
    async with client.get("/health") as resp:  # the count is used up
        assert resp.status == 200


async def test_exit_mid_stream_in_process_drops_the_connection_after_some_tokens(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(fault="exit-mid-stream", tokens=10)
    async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert fake_of(client).counters.requests_failed == 1


async def test_refuse_in_process_drops_connections_until_reset(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    async with client.post("/_fake/fault", json={"fault": "refuse"}) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.get("/health")
    async with client.post("/_fake/fault", json={"fault": "none"}) as resp:
        assert resp.status == 200
    async with client.get("/health") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("body", [{"fault": "explode"}, {"fault": "hang", "count": 0}, {}])
async def test_fault_api_rejects_bad_requests(
    make_client: Callable[..., Awaitable[Client]], body: dict[str, Any]
) -> None:
    client = await make_client()
    async with client.post("/_fake/fault", json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------- connection after stream
async def _raw_stream_then_next(port: int) -> tuple[bytes, bytes]:
    """Stream one chat on a raw connection, then send a second request on the same one.

    Returns what arrived after the stream's last chunk: b"" if the server closed.
    """
    body = json.dumps({**CHAT, "stream": True}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT_S)
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
        after = await asyncio.wait_for(reader.read(200), WAIT_S)
        return head, after
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_connection_closes_after_stream_like_llama_server(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client()
    assert client.port is not None
    head, after = await _raw_stream_then_next(client.port)
    assert b"Keep-Alive: timeout=5, max=100" in head
    assert b"data: [DONE]" in head
    assert after == b""


async def test_keep_alive_after_stream_option_keeps_the_connection(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    client = await make_client(close_after_stream=False)
    assert client.port is not None
    _, after = await _raw_stream_then_next(client.port)
    assert after.startswith(b"HTTP/1.1 200")


# ------------------------------------------------------------- faults (process)
async def test_exit_mid_stream_kills_the_process(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake("--fault", "exit-mid-stream", "--tokens", "50")
    contents: list[str] = []
    request = {**CHAT, "stream": True}
    async with http.post(fake.url + "/v1/chat/completions", json=request) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                text = line.decode()
                if text.startswith("data: ") and "content" in text and '"role"' not in text:
                    contents.append(text)
    assert len(contents) == EXIT_AFTER_TOKENS
    assert await asyncio.wait_for(fake.proc.wait(), WAIT_S) == 1


async def test_exit_mid_stream_injected_at_runtime_kills_the_process(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake("--tokens", "50")
    async with http.post(fake.url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    async with http.post(fake.url + "/_fake/fault", json={"fault": "exit-mid-stream"}) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientError):
        async with http.post(fake.url + "/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
    assert await asyncio.wait_for(fake.proc.wait(), WAIT_S) == 1


async def test_sigterm_stops_a_healthy_fake(
    start_fake: Callable[..., Awaitable[FakeProcess]],
) -> None:
    fake = await start_fake()
    fake.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(fake.proc.wait(), WAIT_S) == 0


async def test_ignore_sigterm_survives_sigterm(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake("--fault", "ignore-sigterm")
    fake.proc.send_signal(signal.SIGTERM)  # ignored signals are discarded when sent
    assert await health_status(http, fake.url) == 200
    assert fake.proc.returncode is None
    fake.proc.kill()
    assert await asyncio.wait_for(fake.proc.wait(), WAIT_S) == -signal.SIGKILL


async def test_ignore_sigterm_injected_at_runtime_survives_sigterm(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake()
    async with http.post(fake.url + "/_fake/fault", json={"fault": "ignore-sigterm"}) as resp:
        assert resp.status == 200
    os.kill(fake.proc.pid, signal.SIGTERM)
    assert await health_status(http, fake.url) == 200
    assert fake.proc.returncode is None


async def test_refuse_fault_closes_the_listening_socket(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake()
    assert await health_status(http, fake.url) == 200
    async with http.post(fake.url + "/_fake/fault", json={"fault": "refuse"}) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientConnectorError):
        await health_status(http, fake.url)
    assert fake.proc.returncode is None


async def test_refuse_at_start_prints_the_port_but_refuses_connections(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake("--fault", "refuse")
    with pytest.raises(aiohttp.ClientConnectorError):
        await health_status(http, fake.url)


async def test_process_options_shape_its_answers(
    start_fake: Callable[..., Awaitable[FakeProcess]], http: aiohttp.ClientSession
) -> None:
    fake = await start_fake(
        "--slots", "2", "--model", "m2", "--ctx-size", "800", "--tokens", "3", "--api-key", "k"
    )
    headers = {"Authorization": "Bearer k"}
    async with http.get(fake.url + "/props", headers=headers) as resp:
        props = await resp.json()
    assert (props["total_slots"], props["model_alias"]) == (2, "m2")
    assert props["default_generation_settings"]["n_ctx"] == 400
    async with http.post(fake.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 3
    async with http.get(fake.url + "/props") as resp:
        assert resp.status == 401


def test_cli_rejects_impossible_options() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--slots", "0"])
    assert exc.value.code == 2


def test_options_copy_keeps_defaults() -> None:
    options = replace(FakeOptions(), slots=4)
    assert FakeLlamaServer(options).n_ctx == 1024
