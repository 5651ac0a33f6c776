"""Which requests get loading notices, and the shape of one notice."""

from __future__ import annotations

import json

import pytest

from corral.gateway.notices import BadNoticeHeader, chunk, wanted

STREAM = {"model": "m", "stream": True, "messages": []}


def never() -> bool:
    raise AssertionError("the configured default was asked")


def test_only_streaming_chat_completions_want_notices() -> None:
    assert wanted("/v1/chat/completions", STREAM, None, lambda: True)
    assert wanted("/chat/completions", STREAM, None, lambda: True)
    assert not wanted("/v1/chat/completions", STREAM, None, lambda: False)
    assert not wanted("/v1/chat/completions", {**STREAM, "stream": False}, "1", never)
    assert not wanted("/v1/chat/completions", {**STREAM, "stream": "yes"}, "1", never)
    assert not wanted("/v1/chat/completions", None, "1", never)
    assert not wanted("/v1/completions", STREAM, "1", never)
    assert not wanted("/completion", STREAM, "1", never)


@pytest.mark.parametrize("value", ["1", "true", "ON", " yes "])
def test_the_header_turns_notices_on_over_the_setting(value: str) -> None:
    assert wanted("/v1/chat/completions", STREAM, value, never)


@pytest.mark.parametrize("value", ["0", "false", "Off", "no"])
def test_the_header_turns_notices_off_over_the_setting(value: str) -> None:
    assert not wanted("/v1/chat/completions", STREAM, value, never)


def test_an_empty_header_leaves_the_setting_and_a_bad_one_is_refused() -> None:
    assert wanted("/v1/chat/completions", STREAM, "  ", lambda: True)
    with pytest.raises(BadNoticeHeader, match="must be 1 or 0"):
        wanted("/v1/chat/completions", STREAM, "sometimes", never)


def test_a_notice_is_a_chat_completion_chunk_with_only_reasoning_content() -> None:
    first = chunk("corral: loading model m…\n", completion_id="c1", model="m", first=True)
    later = chunk("corral: m ready\n", completion_id="c1", model="m", first=False)
    for raw in (first, later):
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    event = json.loads(first[6:])
    assert event["object"] == "chat.completion.chunk"
    assert event["id"] == "c1" and event["model"] == "m"
    assert event["choices"] == [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "content": None,
                "reasoning_content": "corral: loading model m…\n",
            },
            "finish_reason": None,
        }
    ]
    assert json.loads(later[6:])["choices"][0]["delta"] == {
        "reasoning_content": "corral: m ready\n"
    }
