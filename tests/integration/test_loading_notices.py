"""Loading notices: a streaming chat request that waits for its model hears why.

The same real :class:`~corral.serve.LocalServe` over fake llama-servers as
``test_models.py``; ``--load-delay`` keeps a fake loading long enough to wait for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.events import parse_events
from tests.support.local_serve import chat, complete, serving

SLOW = {"args": ["--load-delay", "0.4"]}


async def stream_events(
    http: aiohttp.ClientSession,
    base: str,
    model: str,
    headers: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, list[dict[str, Any]]]:
    """A streamed chat completion: its response and every ``data:`` event's JSON."""
    async with http.post(
        base + "/v1/chat/completions", json=chat(model, True), headers=headers or {}
    ) as response:
        body = await response.read()
    return response, [e.data for e in parse_events(body) if e.data != "[DONE]"]


def notices_of(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["choices"][0]["delta"]["reasoning_content"]
        for e in events
        if e.get("choices") and "reasoning_content" in e["choices"][0].get("delta", {})
    ]


def first_token_at(events: list[dict[str, Any]]) -> int:
    return next(
        i
        for i, e in enumerate(events)
        if e.get("choices") and e["choices"][0]["delta"].get("content")
    )


async def test_loading_notices_arrive_before_the_first_token_of_a_model_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"alpha": SLOW}, loading_notices=True) as (
        _local, base, http,
    ):  # fmt: skip
        response, events = await stream_events(http, base, "alpha")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        notices = notices_of(events)
        assert notices[0] == "corral: loading model alpha…\n"
        assert "corral: starting alpha…\n" in notices
        assert notices[-1].startswith("corral: alpha ready after ")
        first = first_token_at(events)
        assert len(notices_of(events[:first])) == len(notices)  # every notice came first
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        # a loaded model answers at once: no notices
        _, again = await stream_events(http, base, "alpha")
        assert notices_of(again) == []


async def test_the_openai_client_parses_a_stream_with_loading_notices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"alpha": SLOW}, loading_notices=True) as (
        _local, base, _http,
    ):  # fmt: skip
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        reasoning, content = "", ""
        async for part in stream:
            if not part.choices:
                continue
            delta = part.choices[0].delta
            extra = delta.model_extra or {}
            if extra.get("reasoning_content"):
                assert not content, "a notice came after the model's first token"
                reasoning += extra["reasoning_content"]
            content += delta.content or ""
        await client.close()
        assert reasoning.startswith("corral: loading model alpha…\n")
        assert "alpha ready after" in reasoning
        assert content.strip()


async def test_a_swap_notes_the_model_unloaded_to_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"alpha": {}, "beta": SLOW}
    async with serving(tmp_path, monkeypatch, models, loading_notices=True, max_instances=1) as (
        _local,
        base,
        http,
    ):
        assert (await complete(http, base, "alpha"))[0] == 200
        response, events = await stream_events(http, base, "beta")
        assert response.status == 200
        notices = notices_of(events)
        assert notices[:4] == [
            "corral: loading model beta…\n",
            "corral: unloading alpha to make room for beta…\n",
            "corral: unloaded alpha\n",
            "corral: starting beta…\n",
        ]
        assert notices[4].startswith("corral: beta ready after ")
        assert len(notices_of(events[: first_token_at(events)])) == len(notices) == 5


async def test_a_load_failure_ends_the_noticed_stream_with_an_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"bad": {"args": ["--parallel", "many"]}}
    async with serving(
        tmp_path,
        monkeypatch,
        models,
        loading_notices=True,
        restart_max_failures=1,
        buffered_request_timeout=30,
    ) as (_local, base, http):
        response, events = await stream_events(http, base, "bad")
        assert response.status == 200  # the headers went out with the first notice
        assert notices_of(events)[0] == "corral: loading model bad…\n"
        error = events[-1]["error"]
        assert error["code"] == 503
        assert "failed to start" in error["message"]
        assert all("error" not in e for e in events[:-1])

        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="failed to start"):
            stream = await client.chat.completions.create(
                model="bad", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                pass
        await client.close()


async def test_an_upstream_timeout_after_notices_ends_the_stream_with_an_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"alpha": {"args": ["--load-delay", "0.4", "--fault", "hang"]}}
    async with serving(
        tmp_path, monkeypatch, models, loading_notices=True, upstream_first_byte_timeout=0.5
    ) as (_local, base, http):
        response, events = await stream_events(http, base, "alpha")
        assert response.status == 200
        notices = notices_of(events)
        assert notices[0] == "corral: loading model alpha…\n"
        assert notices[-1].startswith("corral: alpha ready after ")
        error = events[-1]["error"]
        assert "sent no response within 0.5 s" in error["message"]
        assert error["code"] == 503


async def test_loading_notices_are_off_by_default_and_a_header_turns_them_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"alpha": SLOW, "beta": SLOW}) as (
        _local, base, http,
    ):  # fmt: skip
        response, events = await stream_events(http, base, "alpha")
        assert response.status == 200
        assert notices_of(events) == []
        assert events[0]["id"].startswith("chatcmpl-") and "corral" not in events[0]["id"]
        header = {"X-Corral-Loading-Notices": "1"}
        _, events = await stream_events(http, base, "beta", header)
        assert notices_of(events)[0] == "corral: loading model beta…\n"
        async with http.post(
            base + "/v1/chat/completions",
            json=chat("beta", True),
            headers={"X-Corral-Loading-Notices": "maybe"},
        ) as bad:
            assert bad.status == 400
            assert "X-Corral-Loading-Notices" in (await bad.json())["error"]["message"]


async def test_a_model_setting_and_a_header_override_the_global_loading_notices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"quiet": {**SLOW, "loading_notices": False}, "alpha": SLOW, "beta": SLOW}
    async with serving(tmp_path, monkeypatch, models, loading_notices=True) as (
        _local, base, http,
    ):  # fmt: skip
        assert notices_of((await stream_events(http, base, "quiet"))[1]) == []
        off = {"X-Corral-Loading-Notices": "0"}
        assert notices_of((await stream_events(http, base, "alpha", off))[1]) == []
        assert notices_of((await stream_events(http, base, "beta"))[1]) != []


async def test_non_streaming_requests_wait_for_a_loading_model_without_notices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"alpha": SLOW}, loading_notices=True) as (
        _local, base, http,
    ):  # fmt: skip
        async with http.post(base + "/v1/chat/completions", json=chat("alpha")) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body = await response.json()
        assert body["object"] == "chat.completion"
        assert "reasoning_content" not in body["choices"][0]["message"]


async def test_an_upstream_error_answer_after_notices_becomes_the_streams_error_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"alpha": SLOW}, loading_notices=True) as (
        _local, base, http,
    ):  # fmt: skip
        bad = {"model": "alpha", "stream": True, "messages": "not a list"}
        async with http.post(base + "/v1/chat/completions", json=bad) as response:
            assert response.status == 200
            raw = (await response.read()).decode()
        events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
        assert notices_of(events)[0] == "corral: loading model alpha…\n"
        error = events[-1]["error"]
        assert error["code"] == 400
        assert error["type"] == "invalid_request_error"
        assert error["message"]
