"""``corral serve`` as a process, with the fake llama-server standing in as its binary."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support.fleet import CHAT
from tests.support.serve_fake import (
    TOKEN,
    Serve,
    cleanup,
    fake_binary,
    healthy,
    ready_serve,
)
from tests.support.waiting import wait_for

__all__ = ["cleanup"]  # the fixture


async def chat(http: aiohttp.ClientSession, serve: Serve) -> tuple[int, Any]:
    async with http.post(serve.base + "/v1/chat/completions", json=CHAT) as response:
        return response.status, await response.json(content_type=None)


async def test_serve_answers_chat_for_the_model_named_after_its_file(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(tmp_path, http, cleanup, "--", "--parallel", "3")
    status, body = await chat(http, serve)
    assert status == 200 and body["model"] == "tiny"
    async with http.get(serve.base + "/health") as response:
        assert (await response.json())["slots_free"] == 3


async def test_serve_restarts_a_crashed_llama_server_while_requests_wait(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(tmp_path, http, cleanup, "--buffered-request-timeout", "30")
    (first,) = serve.llama_servers()
    first.kill()
    await wait_for(lambda: not first.is_running() or first.status() == "zombie", "the crash")
    # a request sent while llama-server is down waits in the buffer and is served
    status, body = await chat(http, serve)
    assert status == 200, body
    (second,) = serve.llama_servers()
    assert second.pid != first.pid
    assert "instance down" in serve.log()
    async with http.get(
        serve.management + "/api/v1/instances", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        (instance,) = (await response.json())["instances"]
    assert instance["supervisor"]["restarts"] == 1
    assert instance["supervisor"]["state"] == "ready"


async def test_serve_refuses_llama_server_args_it_owns(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "serve", "--model", str(model),
        "--llama-server", str(fake_binary(tmp_path)), "--", "--port", "9999",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "CORRAL_STATE_DIR": str(tmp_path)},
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 2
    assert b"corral sets --port itself" in err


async def test_serve_killed_with_sigkill_leaves_no_llama_server_behind(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(tmp_path, http, cleanup)
    (child,) = serve.llama_servers()
    serve.process.send_signal(signal.SIGKILL)
    await serve.process.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert alive == [], "llama-server outlived corral"


async def test_serve_sigterm_stops_llama_server_and_exits_zero(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(tmp_path, http, cleanup)
    (child,) = serve.llama_servers()
    serve.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(serve.process.wait(), 20) == 0, serve.log()
    _, alive = psutil.wait_procs([child], timeout=10)
    assert alive == []


async def test_restart_through_the_api_drains_first_and_loses_no_request(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(
        tmp_path, http, cleanup, "--buffered-request-timeout", "30",
        fake_flags=("--token-delay", "0.05", "--tokens", "10", "--parallel", "3"),
    )  # fmt: skip
    cleanup.append(serve)
    await wait_for(lambda: healthy(http, serve), "serve to be healthy")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(serve.management + "/api/v1/instances", headers=auth) as response:
        (instance,) = (await response.json())["instances"]
    (before,) = serve.llama_servers()
    running = [asyncio.create_task(chat(http, serve)) for _ in range(3)]

    async def in_flight() -> bool:
        async with http.get(serve.management + "/api/v1/instances", headers=auth) as response:
            return bool((await response.json())["instances"][0]["in_flight"] == 3)

    await wait_for(in_flight, "three requests in flight")
    url = f"{serve.management}/api/v1/instances/{instance['id']}/restart"
    async with http.post(url) as response:
        assert response.status == 401
    async with http.post(url, headers=auth) as response:
        assert response.status == 202, await response.text()
        assert (await response.json())["drained"] is True
    arriving = [asyncio.create_task(chat(http, serve)) for _ in range(3)]
    results = await asyncio.gather(*running, *arriving)
    assert [status for status, _ in results] == [200] * 6
    (after,) = serve.llama_servers()
    assert after.pid != before.pid


async def test_restart_of_an_unknown_instance_is_404(
    tmp_path: Path, http: aiohttp.ClientSession, cleanup: list[Serve]
) -> None:
    serve = await ready_serve(tmp_path, http, cleanup)
    async with http.post(
        serve.management + "/api/v1/instances/nope/0/restart",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"


async def test_serve_says_where_the_web_ui_is_and_serves_it_when_llama_server_has_one(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    cleanup: list[Serve],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLAMA_ARG_STATIC_PATH", raising=False)
    ui = tmp_path / "ui"  # beside the fake llama-server, where `llama-server install` puts it
    ui.mkdir()
    (ui / "index.html").write_text("<!doctype html><title>the web UI</title>")
    serve = await ready_serve(tmp_path, http, cleanup)
    assert f"llama-server's web UI: {serve.base}/" in serve.log()
    async with http.get(serve.base + "/") as response:
        assert response.status == 200
        assert "<title>the web UI</title>" in await response.text()
