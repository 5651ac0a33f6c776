"""Keep keys and tokens out of every log line, whichever library writes it.

aiohttp logs a request it cannot parse (bare LF line endings, a broken chunk) at ERROR
with the raw bytes it read, ``Authorization`` header and all; a traceback may carry a
header value too. A filter on every handler of the root logger rewrites each record
before it is written: the values of ``Authorization``, ``Proxy-Authorization`` and
``x-api-key`` headers wherever they appear, and every secret corral was given (API
keys, the management and cluster tokens), become ``[redacted]``. The record's
traceback is rendered first so that it is redacted too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "[redacted]"

#: A header line as text or as the repr of bytes (where ``\r\n`` is four characters).
_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key)(\s*[:=]\s*)(?:[^\s\\'\"]+ )?[^\s\\'\",]+"
)

_secrets: set[str] = set()


def add_secrets(values: Iterable[str | None]) -> None:
    """Redact these values from every log line from now on (short ones are ignored:
    a 3-character key would redact ordinary words)."""
    _secrets.update(v for v in values if v and len(v) >= 6)


def redact(text: str) -> str:
    text = _HEADER.sub(lambda m: m[1] + m[2] + REDACTED, text)
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and traceback) with :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is logging's to report
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None  # rendered (and redacted) above
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(root: logging.Logger | None = None) -> None:
    """Put the filter on every handler of ``root`` (default: the root logger)."""
    root = root or logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
