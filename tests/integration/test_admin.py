"""Admin actions across processes: ``corral balancer`` + ``corral agent --model``.

The agents start and own their llama-servers (the fake, as the binary), so restart,
reconfigure, logs and rolling restarts travel balancer -> agent -> supervisor exactly
as they do across hosts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.integration.fleet import CHAT, wait_for
from tests.integration.test_fleet_processes import (
    MANAGEMENT_TOKEN,
    BalancerProc,
    Proc,
    Processes,
    fleet_of,
    ready_count,
)
from tests.integration.test_serve import fake_binary

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def owning_agent(
    procs: Processes, balancer: BalancerProc, model: Path, *llama_args: str
) -> Proc:
    binary = fake_binary(procs.tmp, "--token-delay", "0.02", "--tokens", "10")
    args = [
        sys.executable, "-m", "corral.cli", "agent", "--model", str(model),
        "--llama-server", str(binary), "--balancer", balancer.management,
        "--log-dir", str(procs.tmp / "logs"), "--", *llama_args,
    ]  # fmt: skip
    return await procs._spawn("agent", args, procs._env())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")  # the fake never reads it
    return path


async def only_instance(http: aiohttp.ClientSession, balancer: BalancerProc) -> dict[str, Any]:
    (instance,) = (await fleet_of(http, balancer))["instances"]
    return dict(instance)


async def chat(http: aiohttp.ClientSession, balancer: BalancerProc) -> int:
    async with http.post(
        f"http://{balancer.inference}/v1/chat/completions", json={**CHAT, "model": "tiny"}
    ) as response:
        await response.read()
        return response.status


async def test_agent_with_model_starts_and_reports_its_own_llama_server(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer()
    agent = await owning_agent(procs, balancer, model, "--parallel", "3")
    await wait_for(ready_count(balancer, http)(1), "the agent's instance")
    instance = await only_instance(http, balancer)
    assert instance["model"] == "tiny" and instance["slots_total"] == 3
    assert instance["supervisor"]["state"] == "ready"
    assert await chat(http, balancer) == 200
    children = psutil.Process(agent.process.pid).children(recursive=True)
    agent.process.terminate()
    assert await asyncio.wait_for(agent.process.wait(), 20) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


async def test_reconfigure_restarts_with_new_arguments_and_loses_no_request(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "30")
    await owning_agent(procs, balancer, model, "--parallel", "1")
    await wait_for(ready_count(balancer, http)(1), "the instance")
    instance = await only_instance(http, balancer)
    url = f"http://{balancer.management}/api/v1/instances/{instance['id']}/reconfigure"
    running = [asyncio.create_task(chat(http, balancer)) for _ in range(4)]
    async with http.post(url, json={"args": ["--parallel", "4"]}, headers=AUTH) as response:
        assert response.status == 202, await response.text()
    later = [asyncio.create_task(chat(http, balancer)) for _ in range(4)]
    assert await asyncio.gather(*running, *later) == [200] * 8

    async def four_slots() -> bool:
        instances = (await fleet_of(http, balancer))["instances"]
        return bool(instances and instances[0]["slots_total"] == 4 and instances[0]["usable"])

    await wait_for(four_slots, "the instance back with 4 slots")


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "/etc/passwd"],
        ["--host", "0.0.0.0"],
        ["--api-key", "x"],
        ["--slot-save-path", "/tmp"],
        ["--port=1"],
        ["--parallel", 4],
    ],
)
async def test_reconfigure_refuses_hostile_arguments(
    procs: Processes, http: aiohttp.ClientSession, model: Path, args: list[Any]
) -> None:
    balancer = await procs.balancer()
    await owning_agent(procs, balancer, model)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    instance = await only_instance(http, balancer)
    url = f"http://{balancer.management}/api/v1/instances/{instance['id']}/reconfigure"
    async with http.post(url, json={"args": args}, headers=AUTH) as response:
        body = await response.json()
        assert response.status == 400
    assert "refused" in body["error"]["message"] or "string" in body["error"]["message"]
    assert (await only_instance(http, balancer))["supervisor"]["restarts"] == 0


async def test_admin_routes_need_the_management_token(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer()
    await owning_agent(procs, balancer, model)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    instance = await only_instance(http, balancer)
    base = f"http://{balancer.management}/api/v1"
    for method, path in (
        ("POST", f"/instances/{instance['id']}/restart"),
        ("POST", f"/instances/{instance['id']}/reconfigure"),
        ("GET", f"/instances/{instance['id']}/logs"),
        ("POST", "/models/tiny/restart"),
    ):
        async with http.request(method, base + path, json={"args": []}) as response:
            assert response.status == 401, path
    assert (await only_instance(http, balancer))["supervisor"]["restarts"] == 0


async def test_logs_return_the_tail_and_follow_new_lines(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer()
    await owning_agent(procs, balancer, model)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    instance = await only_instance(http, balancer)
    url = f"http://{balancer.management}/api/v1/instances/{instance['id']}/logs"
    async with http.get(url + "?lines=50", headers=AUTH) as response:
        assert response.status == 200
        body = await response.json()
    assert any(line.startswith("[corral] starting:") for line in body["lines"])
    async with http.get(url + "?lines=0&follow=1", headers=AUTH) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert await chat(http, balancer) == 200  # the fake logs each request
        async with asyncio.timeout(10):
            event = await response.content.readuntil(b"\n\n")
        assert event.startswith(b"data: ")
        assert isinstance(json.loads(event[6:]), str)
    log_files = list((procs.tmp / "logs").glob("tiny-*.log"))
    assert log_files and log_files[0].stat().st_size > 0


async def test_rolling_restart_keeps_the_model_serving(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "30")
    await owning_agent(procs, balancer, model, "--parallel", "2")
    await owning_agent(procs, balancer, model, "--parallel", "2")
    await wait_for(ready_count(balancer, http)(2), "two instances")
    before = {
        i["id"]: i["supervisor"]["pid"] for i in (await fleet_of(http, balancer))["instances"]
    }
    stop = asyncio.Event()
    statuses: collections.Counter[int] = collections.Counter()

    async def traffic() -> None:
        while not stop.is_set():
            statuses[await chat(http, balancer)] += 1

    clients = [asyncio.create_task(traffic()) for _ in range(3)]
    async with http.post(
        f"http://{balancer.management}/api/v1/models/tiny/restart", headers=AUTH
    ) as response:
        body = await response.json()
        assert response.status == 200, body
    stop.set()
    await asyncio.gather(*clients)
    assert [r["ready"] for r in body["restarted"]] == [True, True]
    after = {i["id"]: i["supervisor"]["pid"] for i in (await fleet_of(http, balancer))["instances"]}
    assert set(after) == set(before)
    assert all(after[i] != before[i] for i in before)
    assert set(statuses) == {200}, statuses


async def test_agent_starts_every_model_of_its_config_file(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    balancer = await procs.balancer()
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"models:\n"
        f"  alpha:\n    path: {tmp_path / 'alpha.gguf'}\n    args: [--parallel, '2']\n"
        f"  beta:\n    path: {tmp_path / 'beta.gguf'}\n    aliases: [b]\n"
    )
    binary = fake_binary(tmp_path)
    await procs._spawn(
        "agent",
        [
            sys.executable, "-m", "corral.cli", "agent", "--config", str(config),
            "--llama-server", str(binary), "--balancer", balancer.management,
        ],
        procs._env(),
    )  # fmt: skip
    await wait_for(ready_count(balancer, http)(2), "both configured models")
    instances = {i["model"]: i for i in (await fleet_of(http, balancer))["instances"]}
    assert instances["alpha"]["slots_total"] == 2
    assert "b" in instances["beta"]["aliases"]
    async with http.post(
        f"http://{balancer.inference}/v1/chat/completions", json={**CHAT, "model": "b"}
    ) as response:
        assert response.status == 200
        assert (await response.json())["model"] == "beta"
