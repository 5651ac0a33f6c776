"""``corral serve`` in front of the real llama-server on the tiny model.

corral runs as its own process, exactly as a user starts it; the official ``openai``
client talks to its front door. This proves what the fake can't: the agent reads a
real server's readiness and slots, streaming passes through untouched, and many
concurrent streams lose nothing to llama-server closing connections after a stream.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.error
import urllib.request

import aiohttp
import psutil
import pytest
from openai import OpenAI

from tests.support.serve_process import TOKEN, Corral, corral

pytestmark = pytest.mark.real
__all__ = ["corral"]  # the fixture


def test_serve_reports_the_real_servers_slots(corral: Corral) -> None:
    fleet = corral.fleet()
    (instance,) = fleet["instances"]  # type: ignore[misc]
    assert instance["slots_total"] == 4
    assert instance["model"] == "tiny"
    assert instance["state"] == "ready"


def test_openai_client_chat_completion_through_corral(corral: Corral) -> None:
    client = OpenAI(base_url=corral.base + "/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8


def test_openai_client_streams_through_corral(corral: Corral) -> None:
    client = OpenAI(base_url=corral.base + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason == "length"


def test_many_concurrent_streams_lose_no_request(corral: Corral) -> None:
    """llama-server closes a connection after a stream despite keep-alive; corral must
    neither reuse such a connection nor lose the request when it happens."""

    async def run() -> list[int]:
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> int:
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"request {i}"}],
                    "max_tokens": 4,
                    "stream": True,
                }
                async with session.post(corral.base + "/v1/chat/completions", json=body) as r:
                    text = await r.text()
                    return r.status if "[DONE]" in text else -1

            return list(await asyncio.gather(*(one(i) for i in range(120))))

    statuses = asyncio.run(run())
    assert statuses.count(200) == len(statuses), statuses


def _metric(corral: Corral, name: str) -> float:
    request = urllib.request.Request(
        corral.management + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_connections_that_carried_a_stream_are_never_reused(corral: Corral) -> None:
    """llama-server closes a connection after a stream while advertising keep-alive;
    reusing it fails the next request (corral would have to resend it)."""
    before = _metric(corral, "corral_upstream_stale_connections_total")

    async def run() -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def client(c: int) -> list[int]:
                statuses = []
                for n in range(20):
                    body = {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": f"{c} {n}"}],
                        "max_tokens": 2,
                        "stream": n % 2 == 0,
                    }
                    async with session.post(
                        corral.base + "/v1/chat/completions", json=body
                    ) as response:
                        await response.read()
                        statuses.append(response.status)
                return statuses

            results = await asyncio.gather(*(client(c) for c in range(4)))
            return [status for statuses in results for status in statuses]

    assert set(asyncio.run(run())) == {200}
    assert _metric(corral, "corral_upstream_stale_connections_total") == before


def test_sigterm_stops_corral_and_its_llama_server(corral: Corral) -> None:
    children = psutil.Process(corral.process.pid).children(recursive=True)
    assert any("llama-server" in " ".join(c.cmdline()) for c in children)
    corral.process.send_signal(signal.SIGTERM)
    assert corral.process.wait(30) == 0, corral.log()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
