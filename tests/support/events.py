"""Reading server-sent event streams in tests: the dashboard's, ``/models/sse`` and
streamed completions, with one parser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Event:
    kind: str
    """The ``event:`` field, ``message`` when there is none."""
    data: Any
    """The ``data:`` lines' JSON (``[DONE]`` stays the string it is)."""


def parse_event(raw: bytes) -> Event | None:
    """One event's lines (no blank line), or None for a comment or keep-alive."""
    kind, data, seen = "message", b"", False
    for line in raw.split(b"\n"):
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            data += line[6:]
            seen = True
    if not seen:
        return None
    return Event(kind, "[DONE]" if data == b"[DONE]" else json.loads(data))


def parse_events(body: bytes) -> list[Event]:
    """Every event of a whole event-stream body."""
    events = (parse_event(raw) for raw in body.split(b"\n\n"))
    return [e for e in events if e is not None]


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """A live stream's events as they arrive (until it ends)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        for raw in complete:
            event = parse_event(raw)
            if event is not None:
                yield event


async def collect(
    stream: AsyncIterator[Event], until: Callable[[list[Any]], bool], limit_s: float = 10.0
) -> list[Any]:
    """The data of ``stream``'s next events, up to the one after which ``until(data
    so far)`` holds; fails after ``limit_s``. The stream goes on from there."""
    data: list[Any] = []
    async with asyncio.timeout(limit_s):
        while not until(data):
            data.append((await anext(stream)).data)
    return data
