"""Corral's parts as separate processes for integration tests: ``corral balancer``,
``corral agent`` and the fake llama-server, each started from its own command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

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
