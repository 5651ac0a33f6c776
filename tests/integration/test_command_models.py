"""Models served by another OpenAI-compatible server, started from a command template.

Each test runs a real :class:`~corral.serve.LocalServe` whose models have ``cmd``: the
"other server" is a real program, the fake llama-server started through the template
as its own process (``python -m corral.testing.fake_llama_server --host ${host} --port
${port} ...``), so corral knows it only by what a generic server offers: a health path
and the OpenAI paths. Its ``/props`` and ``/slots`` exist but must never be read.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest
from yarl import URL

from corral.serve import LocalServe
from tests.support.local_serve import (
    AUTH,
    chat,
    complete,
    pid_of,
    running,
    serving_table,
    settled,
    stream_through,
)
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for

#: The other server: the fake llama-server as a plain program, on corral's address.
SERVER = [sys.executable, "-m", "corral.testing.fake_llama_server", "--host", "${host}"]
SERVER += ["--port", "${port}"]


def other_server(*extra: str) -> list[str]:
    """A ``cmd`` running the fake, named by its model id, with ``extra`` flags."""
    return [*SERVER, "--alias", "${model_id}", *extra]


@asynccontextmanager
async def serving(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: dict[str, dict[str, Any]],
    *,
    llama_server: bool = True,
    **settings: Any,
) -> AsyncIterator[tuple[LocalServe, str, aiohttp.ClientSession]]:
    """A LocalServe whose ``models`` table is exactly ``models`` (its llama-server the
    fake, or none found when not ``llama_server``)."""
    binary = fake_binary(tmp_path) if llama_server else None
    async with serving_table(tmp_path, monkeypatch, models, binary, **settings) as served:
        yield served


def server_log(local: LocalServe, key: str) -> str:
    """Everything the model's server wrote (its access log among it)."""
    assert local.host is not None
    return "\n".join(local.host.running[key].managed.supervisor.output.lines)


def instance_url(local: LocalServe, key: str) -> str:
    assert local.host is not None
    return local.host.running[key].url


async def test_a_command_model_starts_on_demand_through_its_template_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {
        "vllm-like": {
            # no GGUF: the "model" is a repo id, handed over as ${model_path}
            "path": "org/Some-Model",
            "cmd": [*SERVER, "--model", "${model_path}", "-np", "8"],
            "slots": 3,
            "aliases": ["some"],
        }
    }
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        assert running(local) == {}
        results = await asyncio.gather(*(complete(http, base, "vllm-like") for _ in range(5)))
        assert [status for status, _ in results] == [200] * 5
        # the server named the model after what ${model_path} gave it
        assert {body["model"] for _, body in results} == {"org/Some-Model"}
        assert local.host is not None and local.host.loads == 1
        assert await settled(local) == {"vllm-like": "loaded"}
        port = instance_url(local, "vllm-like").rsplit(":", 1)[1]
        pid = pid_of(local, "vllm-like")
        assert pid is not None
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[cmdline.index("--host") + 1] == "127.0.0.1"
        assert cmdline[cmdline.index("--port") + 1] == port
        assert cmdline[cmdline.index("--model") + 1] == "org/Some-Model"

        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(
            model="some", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model="vllm-like", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces).strip()

        (instance,) = local.balancer.scheduler.fleet.pool("vllm-like")
        assert instance.total_slots == 3  # the configured count, not the server's 8
        # the agent asked only the health path: never llama-server's /props or /slots
        log = server_log(local, "vllm-like")
        assert "GET /health" in log
        assert "GET /props" not in log and "GET /slots" not in log
        async with http.get(base + "/v1/models") as response:
            (listed,) = (await response.json())["data"]
        assert listed["id"] == "vllm-like" and listed["status"]["value"] == "loaded"
        assert listed["status"]["args"][-2:] == ["-np", "8"]  # the template as written
        management = f"http://{local.balancer.addresses.management}"
        async with http.get(management + "/api/v1/models", headers=AUTH) as response:
            (row,) = (await response.json())["models"]
        assert row["server"] == "command" and row["state"] == "loaded"


async def test_the_configured_slots_bound_what_the_server_gets_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"cmd": other_server("-np", "8", "--token-delay", "0.05"), "slots": 2}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        results = await asyncio.gather(*(complete(http, base, "a") for _ in range(6)))
        assert [status for status, _ in results] == [200] * 6
        async with http.get(instance_url(local, "a") + "/_fake/state") as response:
            state = await response.json()
        assert state["requests_served"] == 6
        assert state["max_in_flight"] == 2  # the server could take 8: corral sent 2


async def test_the_health_path_decides_when_a_command_model_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {
        "models-ready": {
            "cmd": other_server("--load-delay", "0.5"),
            "health_path": "/v1/models",
        },
        # the server has no such path: it never becomes ready, whatever /health says
        "never-ready": {"cmd": other_server(), "health_path": "/not-here"},
    }
    settings = {"startup_timeout": 2, "restart_max_failures": 1, "buffered_request_timeout": 30}
    async with serving(tmp_path, monkeypatch, models, **settings) as (local, base, http):
        status, body = await complete(http, base, "models-ready")
        assert status == 200 and body["model"] == "models-ready"
        log = server_log(local, "models-ready")
        assert "GET /v1/models" in log and "GET /health" not in log
        status, body = await complete(http, base, "never-ready")
        assert status == 503
        message = body["error"]["message"]
        assert "failed to start" in message and "was not ready within 2 s" in message
        assert "never-ready" not in running(local)


async def test_a_path_outside_the_model_paths_gets_a_404_naming_the_prefixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"chat-only": {"cmd": other_server(), "paths": ["/v1/chat/"]}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        for path in ("/v1/completions", "/completion", "/v1/embeddings"):
            body = {"model": "chat-only", "prompt": "hi", "input": "hi"}
            async with http.post(base + path, json=body) as response:
                assert response.status == 404, path
                error = (await response.json())["error"]
            assert error["type"] == "not_found_error"
            assert "serves only paths starting with /v1/chat/" in error["message"]
            assert f"POST {path} is not one of them" in error["message"]
        # dot segments go upstream raw: they would leave the prefix, so they are refused
        for raw in ("/v1/chat/../../props", "/v1/chat/%2e%2e/%2e%2e/slots", "/v1/chat/..%2f"):
            url = URL(base + raw, encoded=True)
            async with http.post(url, json=chat("chat-only")) as response:
                assert response.status == 404, raw
                assert "serves only paths" in (await response.json())["error"]["message"]
        assert running(local) == {}  # refused before anything was started for it
        assert (await complete(http, base, "chat-only"))[0] == 200


async def test_llama_server_flags_are_refused_for_a_command_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {"cmd": other_server()}}) as (
        local,
        base,
        http,
    ):
        for header in ("X-Corral-Flags", "X-Agent-Flags"):
            async with http.post(
                base + "/v1/chat/completions", json=chat("a"), headers={header: "-c 1024"}
            ) as response:
                assert response.status == 400
                message = (await response.json())["error"]["message"]
            assert "do not apply to model 'a'" in message and "not llama-server" in message
        assert running(local) == {}
        assert (await complete(http, base, "a"))[0] == 200


async def test_eviction_and_unload_drain_a_command_model_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = other_server("-np", "4", "--token-delay", "0.1", "--tokens", "10")
    models = {"a": {"cmd": slow}, "b": {"cmd": slow}}
    async with serving(tmp_path, monkeypatch, models, max_instances=1) as (local, base, http):
        began = asyncio.Event()
        streams = [
            asyncio.create_task(stream_through(http, base, "a", began.set)) for _ in range(2)
        ]
        await began.wait()
        assert (await complete(http, base, "b"))[0] == 200  # needs a's place: a drains
        for status, body in await asyncio.gather(*streams):
            assert status == 200 and "[DONE]" in body and "error" not in body
        assert await settled(local) == {"b": "loaded"}

        began.clear()
        stream = asyncio.create_task(stream_through(http, base, "b", began.set))
        await began.wait()
        management = f"http://{local.balancer.addresses.management}"
        async with http.post(management + "/api/v1/models/b/unload", headers=AUTH) as response:
            assert response.status == 200, await response.text()
        assert stream.done()  # the unload answered only after the stream ended
        status, body = stream.result()
        assert status == 200 and "[DONE]" in body and "error" not in body
        assert running(local) == {}


async def test_a_crashed_command_server_is_restarted_and_serves_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {"cmd": other_server()}}) as (
        local,
        base,
        http,
    ):
        assert (await complete(http, base, "a"))[0] == 200
        first = pid_of(local, "a")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await wait_for(
            lambda: pid_of(local, "a") not in (None, first), "the server to be started again"
        )
        assert (await complete(http, base, "a"))[0] == 200
        assert local.host is not None
        supervisor = local.host.running["a"].managed.supervisor
        assert supervisor.restarts >= 1 and supervisor.readies == 2
        assert local.host.loads == 1  # restarted by its supervisor, not loaded again


async def test_an_idle_command_model_is_unloaded_after_its_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {"cmd": other_server(), "ttl": 1}}) as (
        local,
        base,
        http,
    ):
        assert (await complete(http, base, "a"))[0] == 200
        pid = pid_of(local, "a")
        await wait_for(lambda: running(local) == {}, "the idle model to be unloaded")
        assert pid is not None and not psutil.pid_exists(pid)  # stopped, not just forgotten


async def test_command_models_run_where_no_llama_server_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "b.gguf"
    gguf.write_bytes(b"GGUF")
    models = {"a": {"cmd": other_server()}, "b": {"path": str(gguf)}}
    async with serving(tmp_path, monkeypatch, models, llama_server=False) as (local, base, http):
        assert (await complete(http, base, "a"))[0] == 200
        status, body = await complete(http, base, "b")
        assert status == 503
        assert "'b' needs llama-server, and none was found" in body["error"]["message"]
        assert await settled(local) == {"a": "loaded"}
