"""One fleet: a balancer places models on agents that are model hosts.

Three processes besides the balancer: ``corral agent --models-dir DIR`` on different
folders (different catalogs), each starting the fake llama-server (a real program) when
the balancer asks. The balancer has no model of its own: what it lists and loads is what
its hosts offer.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.catalog.tiny import make_tiny_model
from tests.support.fleet import CHAT
from tests.support.processes import MANAGEMENT_TOKEN, BalancerProc, Proc, Processes, fleet_of
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


def folder(tmp: Path, name: str, *models: str) -> Path:
    path = tmp / name
    path.mkdir()
    for index, model in enumerate(models):
        make_tiny_model(path / f"{model}.gguf", seed=index)
    return path


async def model_host(
    procs: Processes, balancer: BalancerProc, models: Path, name: str, *flags: str
) -> Proc:
    binary = fake_binary(procs.tmp)
    args = [
        sys.executable, "-m", "corral.cli", "agent", "--balancer", balancer.management,
        "--models-dir", str(models), "--llama-server", str(binary), "--name", name,
        "--log-dir", str(procs.tmp / "logs"), *flags,
    ]  # fmt: skip
    return await procs._spawn(f"host-{name}", args, procs._env())


async def chat(http: aiohttp.ClientSession, balancer: BalancerProc, model: str) -> tuple[int, Any]:
    body = {**CHAT, "model": model}
    async with http.post(f"http://{balancer.inference}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def listed(http: aiohttp.ClientSession, balancer: BalancerProc) -> set[str]:
    async with http.get(f"http://{balancer.inference}/v1/models") as response:
        assert response.status == 200
        return {m["id"] for m in (await response.json())["data"]}


async def where(http: aiohttp.ClientSession, balancer: BalancerProc) -> dict[str, str]:
    """model -> the name of the agent process its instance reports from."""
    fleet = await fleet_of(http, balancer)
    agents = {a["id"]: a["name"] for a in fleet.get("agents", [])}
    return {i["model"]: agents.get(i["agent_id"], i["agent_id"]) for i in fleet["instances"]}


async def test_models_start_on_the_host_that_has_them_and_evict_only_there(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    balancer = await procs.balancer()
    await model_host(procs, balancer, folder(tmp_path, "one", "alpha"), "one")
    await model_host(
        procs, balancer, folder(tmp_path, "two", "beta", "gamma"), "two", "--max-instances", "1"
    )

    async def offered() -> bool:
        return await listed(http, balancer) == {"alpha", "beta", "gamma"}

    await wait_for(offered, "both hosts' models to be listed")
    # beta: only host two has it
    status, body = await chat(http, balancer, "beta")
    assert status == 200, body
    assert body["model"] == "beta"
    assert (await where(http, balancer)).get("beta") == "two"
    # alpha: host one
    status, body = await chat(http, balancer, "alpha")
    assert status == 200, body
    assert (await where(http, balancer)).get("alpha") == "one"
    # gamma: host two again, which runs one server at most: beta goes, alpha stays
    status, body = await chat(http, balancer, "gamma")
    assert status == 200, body

    async def swapped() -> bool:
        placed = await where(http, balancer)
        return placed.get("gamma") == "two" and "beta" not in placed

    await wait_for(swapped, "beta to make room for gamma on host two")
    assert (await where(http, balancer)).get("alpha") == "one"
    # the management API shows every model with its state
    async with http.get(f"http://{balancer.management}/api/v1/models", headers=AUTH) as r:
        assert r.status == 200
        states = {m["id"]: m["state"] for m in (await r.json())["models"]}
    assert states == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
    # a model no host has is a clear 404
    status, body = await chat(http, balancer, "delta")
    assert status == 404, body


async def test_a_host_that_leaves_takes_its_models_and_they_load_again_elsewhere(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    balancer = await procs.balancer()
    first = await model_host(procs, balancer, folder(tmp_path, "a", "shared"), "a")

    async def offered() -> bool:
        return "shared" in await listed(http, balancer)

    await wait_for(offered, "host a's model")
    assert (await chat(http, balancer, "shared"))[0] == 200
    assert (await where(http, balancer)).get("shared") == "a"
    await model_host(procs, balancer, folder(tmp_path, "b", "shared"), "b")
    await asyncio.sleep(1.5)  # b reports
    first.process.terminate()  # a stops (its servers drain and stop with it)
    await first.process.wait()

    async def moved() -> bool:
        status, _ = await chat(http, balancer, "shared")
        return status == 200 and (await where(http, balancer)).get("shared") == "b"

    await wait_for(moved, "shared to load on host b", limit_s=30)


@pytest.fixture(autouse=True)
def _quiet_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_FAKE_DEVICES", raising=False)
