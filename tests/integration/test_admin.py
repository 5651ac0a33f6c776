"""Admin actions across processes: ``corral balancer`` + ``corral agent --model``.

The agents start and own their llama-servers (the fake, as the binary), so restart,
reconfigure, logs and rolling restarts travel balancer -> agent -> supervisor exactly
as they do across hosts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support.fleet import CHAT
from tests.support.processes import (
    MANAGEMENT_TOKEN,
    BalancerProc,
    Proc,
    Processes,
    fleet_of,
    ready_count,
)
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}


async def owning_agent(
    procs: Processes,
    balancer: BalancerProc,
    model: Path,
    *llama_args: str,
    flags: tuple[str, ...] = (),
    fake: tuple[str, ...] = ("--token-delay", "0.02", "--tokens", "10"),
    env: dict[str, str] | None = None,
) -> Proc:
    binary = fake_binary(procs.tmp, *fake)
    args = [
        sys.executable, "-m", "corral.cli", "agent", "--model", str(model),
        "--llama-server", str(binary), "--balancer", balancer.management,
        "--log-dir", str(procs.tmp / "logs"), *flags, "--", *llama_args,
    ]  # fmt: skip
    return await procs._spawn("agent", args, procs._env(**(env or {})))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")  # the fake never reads it
    return path


async def only_instance(http: aiohttp.ClientSession, balancer: BalancerProc) -> dict[str, Any]:
    (instance,) = (await fleet_of(http, balancer))["instances"]
    return dict(instance)


async def one_instance(
    procs: Processes,
    http: aiohttp.ClientSession,
    model: Path,
    *balancer_flags: str,
    llama_args: tuple[str, ...] = (),
) -> tuple[BalancerProc, dict[str, Any]]:
    """A balancer with one agent-owned, ready instance, and that instance's view."""
    balancer = await procs.balancer(*balancer_flags)
    await owning_agent(procs, balancer, model, *llama_args)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    return balancer, await only_instance(http, balancer)


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


async def test_an_agents_llama_server_listens_where_other_hosts_reach_it(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    # every address, and balancers told another one (127.0.0.2 stands for the pod's IP)
    balancer = await procs.balancer()
    flags = ("--llama-server-host", "0.0.0.0", "--external-llama-server", "http://127.0.0.2")
    agent = await owning_agent(procs, balancer, model, flags=flags)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    instance = await only_instance(http, balancer)
    (server,) = psutil.Process(agent.process.pid).children(recursive=True)
    line = server.cmdline()
    port = line[line.index("--port") + 1]
    assert line[line.index("--host") + 1] == "0.0.0.0"
    assert instance["url"] == f"http://127.0.0.2:{port}"  # its own port, added to the URL
    assert await chat(http, balancer) == 200  # the balancer dialed 127.0.0.2


async def test_the_devices_its_binary_lists_reach_the_fleet_and_corral_status(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer()
    gpus = "CUDA0|NVIDIA L4|22478|22150;CUDA1|NVIDIA L4|22478|1024"
    await owning_agent(procs, balancer, model, env={"CORRAL_FAKE_DEVICES": gpus})
    await wait_for(ready_count(balancer, http)(1), "the instance")
    devices = (await only_instance(http, balancer))["supervisor"]["devices"]
    assert devices == [
        {"name": "CUDA0", "description": "NVIDIA L4", "total_mib": 22478, "free_mib": 22150},
        {"name": "CUDA1", "description": "NVIDIA L4", "total_mib": 22478, "free_mib": 1024},
    ]
    status = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "status", "--management-addr", balancer.management,
        stdout=asyncio.subprocess.PIPE, env=procs._env(COLUMNS="250"),
    )  # fmt: skip
    out, _ = await status.communicate()
    assert status.returncode == 0
    text = " ".join(out.decode().split())  # the table may wrap a cell
    assert "CUDA0 (NVIDIA L4, 21.6 of 22.0 GiB free)" in text, text


async def test_a_stopping_agent_lets_the_requests_it_was_sent_finish(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer()
    slow = ("--token-delay", "0.1", "--tokens", "30")  # 3 s a request
    agent = await owning_agent(procs, balancer, model, fake=slow)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    running = asyncio.create_task(chat(http, balancer))

    async def busy() -> bool:
        return int((await only_instance(http, balancer))["slots_busy"]) >= 1

    await wait_for(busy, "the request to be running")
    agent.process.terminate()  # a pod stopping: deregister, drain, then stop
    assert await running == 200
    assert await asyncio.wait_for(agent.process.wait(), 20) == 0
    assert "draining model=tiny busy_slots=1" in agent.log_path.read_text()


async def test_reconfigure_restarts_with_new_arguments_and_loses_no_request(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer, instance = await one_instance(
        procs, http, model, "--buffered-request-timeout", "30", llama_args=("--parallel", "1")
    )
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
    ("args", "reason"),
    [
        (["--model", "/etc/passwd"], "--model is not allowed: corral sets the model"),
        (["--host", "0.0.0.0"], "--host is not allowed: corral sets the listening address"),
        (["--api-key", "x"], "--api-key is not allowed: secrets and TLS are corral's"),
        (["--slot-save-path", "/tmp"], "--slot-save-path is not allowed: it reads or writes"),
        (["--port=1"], "--port is not allowed: corral sets the listening address"),
        (["--parallel", 4], "argument 1 must be a string, got int"),
    ],
)
async def test_reconfigure_refuses_hostile_arguments(
    procs: Processes, http: aiohttp.ClientSession, model: Path, args: list[Any], reason: str
) -> None:
    balancer, instance = await one_instance(procs, http, model)
    url = f"http://{balancer.management}/api/v1/instances/{instance['id']}/reconfigure"
    async with http.post(url, json={"args": args}, headers=AUTH) as response:
        body = await response.json()
        assert response.status == 400
    assert body["error"]["message"].startswith("refused llama-server arguments: " + reason)
    assert (await only_instance(http, balancer))["supervisor"]["restarts"] == 0


async def test_admin_routes_need_the_management_token(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer, instance = await one_instance(procs, http, model)
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
    balancer, instance = await one_instance(procs, http, model)
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


async def test_crash_looping_server_ends_failed_with_its_error_and_requests_fail_fast(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "30")
    binary = fake_binary(procs.tmp)
    env = procs._env(
        CORRAL_RESTART_BACKOFF_INITIAL="0.2",
        CORRAL_RESTART_MAX_FAILURES="3",
    )
    await procs._spawn(
        "agent",
        [
            sys.executable, "-m", "corral.cli", "agent", "--model", str(model),
            "--llama-server", str(binary), "--balancer", balancer.management,
            "--", "--parallel", "many",
        ],
        env,
    )  # fmt: skip

    async def failed() -> bool:
        instances = (await fleet_of(http, balancer))["instances"]
        return bool(instances and instances[0]["state"] == "failed")

    await wait_for(failed, "the instance to be marked failed")
    instance = await only_instance(http, balancer)
    assert instance["model"] == "tiny"
    supervisor = instance["supervisor"]
    # never ready: given up after start_attempts (2) launches, before max_failures (3)
    assert supervisor["restarts"] == 1
    assert supervisor["last_exit_code"] == 2
    assert "invalid int value: 'many'" in supervisor["last_error"]
    # no tight loop: it stays failed and stops restarting
    await asyncio.sleep(1.0)
    assert (await only_instance(http, balancer))["supervisor"]["restarts"] == 1
    async with http.post(
        f"http://{balancer.inference}/v1/chat/completions", json={**CHAT, "model": "tiny"}
    ) as response:
        body = await response.json()
    assert response.status == 503
    assert "invalid int value" in body["error"]["message"]


async def test_steady_traffic_survives_reconfigures_and_kills(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    """5 reconfigures and 2 SIGKILLs of supervised servers under steady streaming and
    plain traffic: only requests already streaming on a killed process may fail."""
    balancer = await procs.balancer("--buffered-request-timeout", "60")
    env = procs._env(CORRAL_RESTART_BACKOFF_INITIAL="0.1")
    for _ in range(2):
        binary = fake_binary(procs.tmp, "--token-delay", "0.01", "--tokens", "8")
        await procs._spawn(
            "agent",
            [
                sys.executable, "-m", "corral.cli", "agent", "--model", str(model),
                "--llama-server", str(binary), "--balancer", balancer.management,
                "--", "--parallel", "2",
            ],
            env,
        )  # fmt: skip
    await wait_for(ready_count(balancer, http)(2), "two instances")
    base = f"http://{balancer.inference}/v1/chat/completions"
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(stream: bool) -> None:
        while not stop.is_set():
            body = {**CHAT, "model": "tiny", "stream": stream}
            try:
                async with http.post(base, json=body) as response:
                    text = await response.text()
                if response.status != 200:
                    outcomes[f"status {response.status}"] += 1
                    failures.append(text)
                elif stream and '"error"' in text:
                    outcomes["stream cut mid-way"] += 1  # allowed only after a kill
                else:
                    outcomes["ok"] += 1
            except aiohttp.ClientError as exc:
                outcomes[type(exc).__name__] += 1

    clients = [asyncio.create_task(client(stream)) for stream in (True, False, True, False)]
    ids = sorted(i["id"] for i in (await fleet_of(http, balancer))["instances"])

    last_fleet: list[Any] = []

    async def both_usable() -> bool:
        instances = (await fleet_of(http, balancer))["instances"]
        last_fleet[:] = instances
        return sum(1 for i in instances if i["usable"]) == 2

    for round_ in range(5):
        mark = outcomes["ok"] + 2
        await wait_for(lambda m=mark: outcomes["ok"] >= m, "traffic to flow between actions")
        target = ids[round_ % 2]
        url = f"http://{balancer.management}/api/v1/instances/{target}/reconfigure"
        args = ["--parallel", str(2 + round_ % 2)]
        async with http.post(url, json={"args": args}, headers=AUTH) as response:
            assert response.status == 202, await response.text()
        try:
            await wait_for(both_usable, "both instances back after a reconfigure")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; fleet: {json.dumps(last_fleet, indent=1)}") from None
        if round_ in (1, 3):
            instance = next(
                i for i in (await fleet_of(http, balancer))["instances"] if i["id"] == target
            )
            psutil.Process(instance["supervisor"]["pid"]).kill()
            await wait_for(both_usable, "both instances back after a kill")
    stop.set()
    await asyncio.gather(*clients)
    assert outcomes["ok"] >= 10, outcomes  # traffic really flowed throughout
    allowed = {"ok", "stream cut mid-way"}
    assert set(outcomes) <= allowed, (outcomes, failures)
    assert outcomes["stream cut mid-way"] <= 2 * 2  # at most the streams on 2 killed servers


async def test_reconfigure_moves_an_instance_to_a_new_port(
    procs: Processes, http: aiohttp.ClientSession, model: Path
) -> None:
    balancer, before = await one_instance(
        procs, http, model, "--buffered-request-timeout", "30", llama_args=("--parallel", "2")
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://{balancer.management}/api/v1/instances/{before['id']}/reconfigure"
    async with http.post(url, json={"port": port}, headers=AUTH) as response:
        assert response.status == 202, await response.text()

    async def moved() -> bool:
        instances = (await fleet_of(http, balancer))["instances"]
        return bool(
            instances
            and instances[0]["url"] == f"http://127.0.0.1:{port}"
            and instances[0]["usable"]
        )

    await wait_for(moved, "the instance on its new port")
    assert await chat(http, balancer) == 200
    assert (await only_instance(http, balancer))["slots_total"] == 2  # args kept


@pytest.mark.parametrize(
    "body",
    [{}, {"port": "80"}, {"port": 0}, {"port": True}, {"args": "--parallel 4"}, {"nope": 1}],
)
async def test_reconfigure_refuses_bad_bodies(
    procs: Processes, http: aiohttp.ClientSession, model: Path, body: dict[str, Any]
) -> None:
    balancer, instance = await one_instance(procs, http, model)
    url = f"http://{balancer.management}/api/v1/instances/{instance['id']}/reconfigure"
    async with http.post(url, json=body, headers=AUTH) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == 400
