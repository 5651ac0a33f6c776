"""One fleet: a balancer places models on agents that are model hosts.

Three processes besides the balancer: ``corral agent --models-dir DIR`` on different
folders (different catalogs), each starting the fake llama-server (a real program) when
the balancer asks. The balancer has no model of its own: what it lists and loads is what
its hosts offer.
"""

from __future__ import annotations

import asyncio
import json
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
    procs: Processes,
    balancer: BalancerProc,
    models: Path,
    name: str,
    *flags: str,
    fake: tuple[str, ...] = (),
) -> Proc:
    where = procs.tmp / f"bin-{name}"
    where.mkdir(exist_ok=True)
    binary = fake_binary(where, *fake)
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
    async with http.get(f"http://{balancer.management}/api/v1/hosts", headers=AUTH) as r:
        hosts = {h["name"]: h for h in (await r.json())["hosts"]}
    assert set(hosts) == {"one", "two"}  # no machine of its own
    assert hosts["two"]["models"] == ["beta", "gamma"] and hosts["two"]["max_instances"] == 1
    assert [s["key"] for s in hosts["two"]["servers"]] == ["gamma"]
    assert hosts["one"]["memory_total"] > 0
    # an operator loads on a chosen host, and is told when it cannot
    load = f"http://{balancer.management}/api/v1/models/beta/load"
    async with http.post(load, params={"host": "one"}, headers=AUTH) as r:
        assert r.status == 404
        assert "cannot start" in (await r.json())["error"]["message"]
    async with http.post(load, params={"host": "nowhere"}, headers=AUTH) as r:
        assert r.status == 404
    # corral status shows the hosts: what each runs and can start
    status = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "status", "--management-addr", balancer.management,
        stdout=asyncio.subprocess.PIPE, env=procs._env(COLUMNS="250"),
    )  # fmt: skip
    out, _ = await status.communicate()
    assert status.returncode == 0
    text = " ".join(out.decode().split())
    assert "hosts" in text and "gamma (loaded)" in text and "beta, gamma" in text, text
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


async def test_a_host_killed_mid_load_loses_no_request(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    balancer = await procs.balancer()
    # slow: its server takes 5 s to load, so it is killed while loading
    slow = await model_host(
        procs, balancer, folder(tmp_path, "slow", "m"), "slow", fake=("--load-delay", "5")
    )

    async def offered() -> bool:
        return "m" in await listed(http, balancer)

    await wait_for(offered, "the slow host's model")
    request = asyncio.create_task(chat(http, balancer, "m"))
    await asyncio.sleep(1.5)  # the load went to the slow host, the only one
    await model_host(procs, balancer, folder(tmp_path, "quick", "m"), "quick")
    await asyncio.sleep(1.5)  # the quick host reports
    slow.process.kill()  # gone mid-load, its server with it (PR_SET_PDEATHSIG)
    status, body = await asyncio.wait_for(request, 30)
    assert status == 200, body
    assert (await where(http, balancer)).get("m") == "quick"
    log = balancer.log_path.read_text()
    assert "model host left host=slow lost=['m']" in log  # it was loading there


async def test_a_host_memory_budget_evicts_there_and_not_elsewhere(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # each tiny model is estimated at about 259 MiB (256 MiB of allowance, its file and
    # KV cache): two fit in 600 MiB, three do not
    balancer = await procs.balancer()
    await model_host(procs, balancer, folder(tmp_path, "one", "alpha"), "one")
    await model_host(
        procs, balancer, folder(tmp_path, "two", "beta", "gamma", "eps"), "two",
        "--max-memory", "600MiB",
    )  # fmt: skip

    async def offered() -> bool:
        return await listed(http, balancer) == {"alpha", "beta", "gamma", "eps"}

    await wait_for(offered, "both hosts' models")
    for model in ("alpha", "beta", "gamma"):
        status, body = await chat(http, balancer, model)
        assert status == 200, body
    assert await where(http, balancer) == {"alpha": "one", "beta": "two", "gamma": "two"}
    status, body = await chat(http, balancer, "eps")
    assert status == 200, body

    async def evicted() -> bool:  # beta, the least recently used on host two, went
        return await where(http, balancer) == {"alpha": "one", "gamma": "two", "eps": "two"}

    await wait_for(evicted, "beta to make room on host two only")


async def test_two_balancers_over_the_same_hosts_start_one_server(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    first, second = await procs.balancer(), await procs.balancer()
    for name in ("x", "y"):  # both hosts have the model: both balancers must pick the same
        binary = fake_binary(procs.tmp)
        args = [
            sys.executable, "-m", "corral.cli", "agent", "--balancer", first.management,
            "--balancer", second.management, "--models-dir",
            str(folder(tmp_path, name, "solo")), "--llama-server", str(binary),
            "--name", name, "--max-memory", "2GiB",
        ]  # fmt: skip
        await procs._spawn(f"host-{name}", args, procs._env())

    async def offered() -> bool:
        return all(["solo" in await listed(http, b) for b in (first, second)])

    await wait_for(offered, "both hosts on both balancers")
    await asyncio.sleep(1.2)  # both hosts' reports on both balancers
    results = await asyncio.gather(
        *(chat(http, b, "solo") for b in (first, second, first, second, first, second))
    )
    assert [status for status, _ in results] == [200] * 6, results

    async def one_each() -> bool:
        views = [await fleet_of(http, b) for b in (first, second)]
        urls = [{i["url"] for i in v["instances"] if i["model"] == "solo"} for v in views]
        return len(urls[0]) == 1 and urls[0] == urls[1]

    await wait_for(one_each, "one server, seen by both balancers")


async def test_replicas_follow_demand_across_hosts(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = tmp_path / "balancer.yaml"
    config.write_text(
        json.dumps(
            {
                "models": {"busy": {"replicas": {"min": 0, "max": 2}}},
                "replica_wait": 0.5,
                "replica_idle": 2.0,
                "buffered_request_timeout": 30,
            }
        )
    )
    balancer = await procs.balancer("--config", str(config))
    slow = ("--slots", "1", "--token-delay", "0.05", "--tokens", "30")  # 1.5 s a request
    for name in ("p", "q"):
        await model_host(procs, balancer, folder(tmp_path, name, "busy"), name, fake=slow)

    async def offered() -> bool:
        return "busy" in await listed(http, balancer)

    await wait_for(offered, "the hosts' model")
    await asyncio.sleep(1.2)  # both hosts reported
    # four requests, one slot: they wait, so a second replica starts on the other host
    results = await asyncio.gather(*(chat(http, balancer, "busy") for _ in range(4)))
    assert [status for status, _ in results] == [200] * 4, results
    fleet = await fleet_of(http, balancer)
    agents = {a["id"]: a["name"] for a in fleet["agents"]}
    assert sorted(agents[i["agent_id"]] for i in fleet["instances"]) == ["p", "q"]

    async def back_to_zero() -> bool:  # idle for replica_idle: down to min (0)
        return not (await fleet_of(http, balancer))["instances"]

    await wait_for(back_to_zero, "the idle replicas to stop", limit_s=20)


async def test_per_request_flags_and_loading_notices_work_across_hosts(
    procs: Processes, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = tmp_path / "balancer.yaml"
    config.write_text(json.dumps({"loading_notices": True}))
    balancer = await procs.balancer("--config", str(config))
    await model_host(procs, balancer, folder(tmp_path, "one", "nova"), "one")

    async def offered() -> bool:
        return "nova" in await listed(http, balancer)

    await wait_for(offered, "the host's model")
    url = f"http://{balancer.inference}/v1/chat/completions"
    # a stream that loads the model tells the client so before its first token
    async with http.post(url, json={**CHAT, "model": "nova", "stream": True}) as r:
        assert r.status == 200
        body = (await r.read()).decode()
    events = [
        json.loads(line[6:])
        for line in body.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
    notices = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    first_token = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert notices[0] == "corral: loading model nova…\n"
    assert notices[-1].startswith("corral: nova ready after ")
    assert all(not d.get("content") for d in deltas[: len(notices)])  # notices came first
    assert first_token >= len(notices)
    # per-request flags: a pool of their own, started on the host with those flags
    headers = {"X-Corral-Flags": "-np 3"}
    async with http.post(url, json={**CHAT, "model": "nova"}, headers=headers) as r:
        assert r.status == 200, await r.text()
    fleet = await fleet_of(http, balancer)
    slots = sorted(i["slots_total"] for i in fleet["instances"])
    assert len(fleet["instances"]) == 2 and 3 in slots  # plain nova and nova with -np 3
    # flags a client may not set are refused before anything starts
    headers = {"X-Corral-Flags": "--slot-save-path /tmp"}
    async with http.post(url, json={**CHAT, "model": "nova"}, headers=headers) as r:
        assert r.status == 400


@pytest.fixture(autouse=True)
def _quiet_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_FAKE_DEVICES", raising=False)
