"""A real llama-server under ``corral serve`` reconfigured from 2 to 4 slots under load."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.net import free_port

pytestmark = pytest.mark.real

TOKEN = "reconfigure-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _wait(condition: Any, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_reconfigure_from_2_to_4_slots_under_load_loses_no_request(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    inference, management = free_port(), free_port()
    env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": TOKEN, "CORRAL_STATE_DIR": str(tmp_path)}
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "corral.cli", "serve",
                "--model", str(tiny_model), "--llama-server", str(llama_server_bin),
                "--inference-addr", f"127.0.0.1:{inference}",
                "--management-addr", f"127.0.0.1:{management}",
                "--buffered-request-timeout", "60",
                "--", "--parallel", "2", "--ctx-size", "2048",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base, admin = f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}"

    async def scenario() -> tuple[collections.Counter[str], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as http:

            async def instances() -> list[dict[str, Any]]:
                async with http.get(admin + "/api/v1/instances", headers=AUTH) as response:
                    data: list[dict[str, Any]] = (await response.json())["instances"]
                    return data

            async def usable_with(slots: int) -> bool:
                try:
                    found = await instances()
                except aiohttp.ClientError:
                    return False
                return bool(found) and found[0]["usable"] and found[0]["slots_total"] == slots

            await _wait(lambda: usable_with(2), "2 usable slots")
            outcomes: collections.Counter[str] = collections.Counter()
            stop = asyncio.Event()

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = {
                        "model": "tiny",
                        "messages": [{"role": "user", "content": f"client {n} turn {i}"}],
                        "max_tokens": 8,
                        "stream": n % 2 == 0,
                    }
                    async with http.post(base + "/v1/chat/completions", json=body) as response:
                        text = await response.text()
                    ok = response.status == 200 and '"error"' not in text
                    outcomes["ok" if ok else f"{response.status}: {text[:200]}"] += 1

            clients = [asyncio.create_task(client(n)) for n in range(4)]
            await _wait(lambda: _at_least(outcomes, 8), "traffic to flow")
            (instance,) = await instances()
            async with http.post(
                f"{admin}/api/v1/instances/{instance['id']}/reconfigure",
                json={"args": ["--parallel", "4", "--ctx-size", "4096"]},
                headers=AUTH,
            ) as response:
                assert response.status == 202, await response.text()
            await _wait(lambda: usable_with(4), "4 usable slots after the reconfigure")
            mark = outcomes["ok"] + 8
            await _wait(lambda: _at_least(outcomes, mark), "traffic on the new server")
            stop.set()
            await asyncio.gather(*clients)
            (instance,) = await instances()
            async with http.get(instance["url"] + "/slots") as response:
                slots: list[dict[str, Any]] = await response.json()
            return outcomes, slots

    try:
        outcomes, slots = asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(30)
    assert len(slots) == 4, slots
    assert set(outcomes) == {"ok"}, (outcomes, log_path.read_text()[-3000:])


async def _at_least(outcomes: collections.Counter[str], n: int) -> bool:
    return outcomes["ok"] >= n
