"""Constant-time checks of bearer tokens and API keys."""

from __future__ import annotations

import hmac

from aiohttp import web


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key")


def key_matches(presented: str | None, accepted: list[str]) -> bool:
    """True when ``presented`` equals one of ``accepted``, compared in constant time.

    Every accepted key is compared, so timing does not reveal which one matched. A
    header with bytes that are not UTF-8 (aiohttp keeps them as surrogate escapes) is
    compared as the bytes it was: it matches nothing, like any other wrong key.
    """
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(given, key.encode())
    return matched
