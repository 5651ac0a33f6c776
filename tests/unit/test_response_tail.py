"""Reading what llama-server reports about the prompt from the end of a response."""

from __future__ import annotations

import json

from corral.gateway.accounting import ResponseTail
from corral.gateway.upstream import with_id_slot


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_streamed_response_reports_cache_n_from_its_last_timings_event() -> None:
    tail = ResponseTail(is_sse=True)
    body = sse(
        {"choices": [{"delta": {"content": "hi"}}]},
        {"choices": [], "usage": {"prompt_tokens": 40}, "timings": {"cache_n": 32,
                                                                    "prompt_n": 8,
                                                                    "prompt_ms": 4.0}},
    )  # fmt: skip
    for start in range(0, len(body), 7):  # arrives in arbitrary pieces
        tail.add(body[start : start + 7])
    assert tail.prompt_usage() == (32, 40, 0.004)


def test_plain_response_reports_cached_tokens_from_usage() -> None:
    tail = ResponseTail(is_sse=False)
    tail.add(
        json.dumps(
            {"usage": {"prompt_tokens": 12, "prompt_tokens_details": {"cached_tokens": 10}}}
        ).encode()
    )
    assert tail.prompt_usage() == (10, 12, None)


def test_prompt_tokens_are_derived_from_timings_when_usage_is_missing() -> None:
    tail = ResponseTail(is_sse=False)
    tail.add(json.dumps({"timings": {"cache_n": 5, "prompt_n": 3}}).encode())
    assert tail.prompt_usage() == (5, 8, None)


def test_responses_without_prompt_figures_report_nothing() -> None:
    for body, is_sse in ((b'{"data": []}', False), (b"not json", False), (sse({"a": 1}), True)):
        tail = ResponseTail(is_sse=is_sse)
        tail.add(body)
        assert tail.prompt_usage() is None


def test_a_large_plain_body_is_not_parsed() -> None:
    tail = ResponseTail(is_sse=False)
    tail.add(b"[" + b"0," * (ResponseTail.LIMIT) + b"0]")
    assert tail.prompt_usage() is None


def test_a_stream_keeps_one_event_not_its_text() -> None:
    tail = ResponseTail(is_sse=True)
    words = [{"choices": [{"delta": {"content": "word " * 50}}]} for _ in range(500)]
    final = {"choices": [], "usage": {"prompt_tokens": 9}, "timings": {"cache_n": 7}}
    body = sse(*words, final)
    for start in range(0, len(body), 300):
        tail.add(body[start : start + 300])
    assert len(body) > 100_000
    assert tail.event is not None and len(tail.event) < 200
    assert len(tail.data) < 300  # only the unfinished event is held
    assert tail.prompt_usage() == (7, 9, None)


def test_the_last_usage_event_wins_and_an_unterminated_one_counts() -> None:
    first = {"usage": {"prompt_tokens": 1}, "timings": {"cache_n": 0}}
    second = {"usage": {"prompt_tokens": 5}, "timings": {"cache_n": 4}}
    tail = ResponseTail(is_sse=True)
    tail.add(b"data: " + json.dumps(first).encode() + b"\n\n")
    tail.add(b"data: " + json.dumps(second).encode())  # the stream ends without "\n\n"
    assert tail.prompt_usage() == (4, 5, None)


def test_id_slot_is_spliced_into_the_body_as_sent() -> None:
    body = b'  {"model": "m", "messages": [{"role": "user", "content": "{x}"}]}'
    pinned = with_id_slot(body, 3)
    assert json.loads(pinned) == {**json.loads(body), "id_slot": 3}
    assert pinned.endswith(body.lstrip()[1:])  # the rest is untouched, byte for byte
    assert json.loads(with_id_slot(b"{ }", 0)) == {"id_slot": 0}
    assert with_id_slot(b"[1]", 2) == b"[1]"  # not an object: left alone
