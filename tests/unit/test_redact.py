"""Log redaction: header values and known secrets never survive into a log line."""

from __future__ import annotations

import logging

import pytest

from corral.observe import redact


@pytest.mark.parametrize(
    "line",
    [
        "Authorization: Bearer abcdef123456",
        "b'GET / HTTP/1.1\\r\\nauthorization: Bearer abcdef123456\\r\\n'",
        "x-api-key: abcdef123456",
        "X-Api-Key=abcdef123456, next",
        "Proxy-Authorization: Basic abcdef123456",
    ],
)
def test_header_values_are_redacted_in_text_and_in_reprs(line: str) -> None:
    cleaned = redact.redact(line)
    assert "abcdef123456" not in cleaned
    assert "[redacted]" in cleaned


def test_a_known_secret_is_redacted_anywhere_in_a_record_and_its_traceback() -> None:
    redact.add_secrets(["tok-zyxwvu987654"])
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "saw %s", ("tok-zyxwvu987654",), None
    )
    try:
        raise ValueError("bad token tok-zyxwvu987654")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert redact.RedactSecrets().filter(record)
    text = logging.Formatter().format(record)
    assert "tok-zyxwvu987654" not in text
    assert text.count("[redacted]") >= 2  # the message and the exception


def test_ordinary_lines_are_left_alone() -> None:
    line = "request_id=abc model=tiny status=200 authorization_failures=0"
    assert redact.redact(line) == line
