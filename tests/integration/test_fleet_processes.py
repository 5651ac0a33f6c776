"""The balancer, agents and fake llama-servers as separate processes, as deployed.

Each part is started with its own command line (``corral balancer``, ``corral agent``,
``python -m corral.testing.fake_llama_server``) and talks real HTTP and WebSocket over
loopback; failures are real process deaths (SIGKILL).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.fleet import CHAT, wait_for

MANAGEMENT_TOKEN = "proc-management-token"
CLUSTER_TOKEN = "proc-cluster-token"
START_S = 20.0


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class BalancerProc(Proc):
    inference: str = ""
    management: str = ""


@dataclass
class Processes:
    tmp: Path
    started: list[Proc] = field(default_factory=list)

    def _env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "CORRAL_STATE_DIR": str(self.tmp / "state"),
            "CORRAL_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "CORRAL_CLUSTER_TOKEN": CLUSTER_TOKEN,
            **extra,
        }

    async def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log_path = self.tmp / f"{name}-{len(self.started)}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=log, env=env
            )
        proc = Proc(process, log_path)
        self.started.append(proc)
        return proc

    async def _line(self, proc: Proc, pattern: str, source: str = "stdout") -> re.Match[str]:
        """Wait for a line matching ``pattern`` on stdout, or in the log file (stderr)."""
        async with asyncio.timeout(START_S):
            while True:
                if source == "stdout":
                    assert proc.process.stdout is not None
                    line = (await proc.process.stdout.readline()).decode()
                    if not line:
                        raise AssertionError(f"process ended early:\n{proc.log()}")
                    match = re.search(pattern, line)
                else:
                    match = re.search(pattern, proc.log_path.read_text(errors="replace"))
                    if match is None:
                        if proc.process.returncode is not None:
                            raise AssertionError(f"process ended early:\n{proc.log()}")
                        await asyncio.sleep(0.05)
                        continue
                if match:
                    return match

    async def balancer(self, *flags: str) -> BalancerProc:
        proc = await self._spawn(
            "balancer",
            [
                sys.executable, "-m", "corral.cli", "balancer",
                "--inference-addr", "127.0.0.1:0", "--management-addr", "127.0.0.1:0", *flags,
            ],
            self._env(),
        )  # fmt: skip
        match = await self._line(
            proc, r"inference http://(\S+)\s+management http://(\S+)", source="log"
        )
        return BalancerProc(proc.process, proc.log_path, match[1], match[2])

    async def fake(self, *flags: str) -> str:
        proc = await self._spawn(
            "fake",
            [sys.executable, "-m", "corral.testing.fake_llama_server", "--port", "0", *flags],
            self._env(),
        )
        return (await self._line(proc, r"listening on (http://\S+)"))[1]

    async def agent(self, llama_url: str, *balancers: str, token: str = CLUSTER_TOKEN) -> Proc:
        args = [sys.executable, "-m", "corral.cli", "agent", "--local-llama-server", llama_url]
        for address in balancers:
            args += ["--balancer", address]
        return await self._spawn("agent", args, self._env(CORRAL_CLUSTER_TOKEN=token))

    async def close(self) -> None:
        for proc in self.started:
            if proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
            await proc.process.wait()


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


async def fleet_of(http: aiohttp.ClientSession, balancer: BalancerProc) -> dict[str, Any]:
    async with http.get(
        f"http://{balancer.management}/api/v1/fleet",
        headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
    ) as response:
        assert response.status == 200
        data: dict[str, Any] = await response.json()
        return data


def ready_count(balancer: BalancerProc, http: aiohttp.ClientSession) -> Callable[[int], Any]:
    def check(n: int) -> Callable[[], Awaitable[bool]]:
        async def condition() -> bool:
            fleet = await fleet_of(http, balancer)
            return sum(1 for i in fleet["instances"] if i["usable"]) == n

        return condition

    return check


async def chat(
    http: aiohttp.ClientSession, balancer: BalancerProc, model: str = "m"
) -> tuple[int, dict[str, Any], str]:
    async with http.post(
        f"http://{balancer.inference}/v1/chat/completions", json={**CHAT, "model": model}
    ) as response:
        body = await response.json(content_type=None)
        return response.status, body, response.headers.get("X-Corral-Instance", "")


async def fake_state(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/_fake/state") as response:
        data: dict[str, Any] = await response.json()
        return data


async def test_requests_spread_evenly_over_idle_instances(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer()
    urls = [await procs.fake("--model", "m", "--slots", "2") for _ in range(3)]
    for url in urls:
        await procs.agent(url, balancer.management)
    await wait_for(ready_count(balancer, http)(3), "three usable instances")
    results = [await chat(http, balancer) for _ in range(30)]
    assert [status for status, _, _ in results] == [200] * 30
    served = [(await fake_state(http, url))["requests_served"] for url in urls]
    assert sum(served) == 30
    assert min(served) >= 8, served  # idle instances take turns (10 each when exact)


async def test_agent_that_dies_leaves_the_pool_and_buffered_requests_go_elsewhere(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "30")
    slow = ["--model", "m", "--slots", "1", "--token-delay", "0.1", "--tokens", "10"]
    doomed_url, other_url = await procs.fake(*slow), await procs.fake(*slow)
    doomed_agent = await procs.agent(doomed_url, balancer.management)
    await wait_for(ready_count(balancer, http)(1), "the first instance")
    await procs.agent(other_url, balancer.management)
    await wait_for(ready_count(balancer, http)(2), "both instances")
    requests = [asyncio.create_task(chat(http, balancer)) for _ in range(6)]

    async def two_in_flight() -> bool:
        fleet = await fleet_of(http, balancer)
        return sum(i["in_flight"] for i in fleet["instances"]) == 2

    await wait_for(two_in_flight, "both slots taken")
    doomed_agent.process.send_signal(signal.SIGKILL)
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await wait_for(ready_count(balancer, http)(1), "the dead agent's instance to leave")
    assert loop.time() - killed_at < 3.0
    results = await asyncio.gather(*requests)
    assert [status for status, _, _ in results] == [200] * 6
    doomed = await fake_state(http, doomed_url)
    other = await fake_state(http, other_url)
    assert doomed["requests_served"] == 1  # only the request already running there
    assert other["requests_served"] == 5


async def test_agent_without_the_cluster_token_is_refused_and_gets_no_traffic(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer("--buffered-request-timeout", "0.5")
    rogue_url = await procs.fake("--model", "rogue", "--slots", "4")
    rogue = await procs.agent(rogue_url, balancer.management, token="not-the-token")
    await procs._line(rogue, r"cluster token", source="log")
    fleet = await fleet_of(http, balancer)
    assert fleet["agents"] == [] and fleet["instances"] == []
    status, body, _ = await chat(http, balancer, "rogue")
    assert status == 504, body
    state = await fake_state(http, rogue_url)
    assert state["requests_served"] == state["requests_failed"] == state["max_in_flight"] == 0
    assert "not-the-token" not in rogue.log()


async def test_two_balancers_over_the_same_agents_each_serve_alone(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    first, second = await procs.balancer(), await procs.balancer()
    urls = [await procs.fake("--model", "m", "--slots", "2") for _ in range(2)]
    for url in urls:
        await procs.agent(url, first.management, second.management)
    for balancer in (first, second):
        await wait_for(ready_count(balancer, http)(2), "both instances on each balancer")
    for balancer in (first, second):
        results = [await chat(http, balancer) for _ in range(4)]
        assert [status for status, _, _ in results] == [200] * 4
        assert len({instance for _, _, instance in results}) == 2
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    results = [await chat(http, second) for _ in range(4)]
    assert collections.Counter(status for status, _, _ in results) == {200: 4}


async def test_balancer_sigterm_exits_zero_after_in_flight_requests_finish(
    procs: Processes, http: aiohttp.ClientSession
) -> None:
    balancer = await procs.balancer()
    url = await procs.fake("--model", "m", "--slots", "1", "--token-delay", "0.1", "--tokens", "8")
    await procs.agent(url, balancer.management)
    await wait_for(ready_count(balancer, http)(1), "the instance")
    running = asyncio.create_task(chat(http, balancer))

    async def in_flight() -> bool:
        return (await fake_state(http, url))["in_flight"] == 1

    await wait_for(in_flight, "the request to start")
    balancer.process.send_signal(signal.SIGTERM)
    status, body, _ = await running
    assert status == 200, body
    assert await asyncio.wait_for(balancer.process.wait(), START_S) == 0
