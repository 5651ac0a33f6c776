"""``corral serve``: a balancer, a local agent and one llama-server in one process.

This is the one-machine way to start corral. The llama-server child gets a loopback
port from the configured range and its model's file stem as its alias; the agent
watches it and reports to the balancer in the same process over the same protocol a
remote agent uses, so what works here works across hosts. If llama-server exits
unexpectedly it is started again with exponential backoff (1 s doubling to 60 s,
reset after it stayed up for a minute) while requests wait in the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.balancer import Balancer, BoundAddresses
from corral.config import Settings
from corral.control.agent import Agent, AgentOptions
from corral.supervisor.process import ChildProcess, free_port

log = logging.getLogger(__name__)

RESTART_BACKOFF_INITIAL = 1.0
RESTART_BACKOFF_MAX = 60.0
RESTART_BACKOFF_RESET_AFTER = 60.0
STOP_GRACE = 10.0

#: llama-server arguments corral sets itself; a user may not override them.
RESERVED_ARGS = frozenset({"--host", "--port", "-m", "--model", "--alias", "-a"})


@dataclass
class ServeOptions:
    model: Path
    binary: Path
    management_token: str
    cluster_token: str
    llama_args: list[str] = field(default_factory=list)


class LocalServe:
    """Balancer + agent + supervised llama-server on one event loop."""

    @staticmethod
    def check_args(llama_args: list[str]) -> None:
        """Refuse llama-server arguments corral must own (address, model, alias)."""
        reserved = sorted(a for a in llama_args if a.split("=")[0] in RESERVED_ARGS)
        if reserved:
            raise ValueError(
                f"corral sets {', '.join(reserved)} itself; remove them from the "
                "llama-server arguments"
            )

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.check_args(options.llama_args)
        self.settings = settings
        self.options = options
        self.model_id = options.model.stem
        self.balancer = Balancer(
            settings,
            management_token=options.management_token,
            cluster_token=options.cluster_token,
        )
        self.child: ChildProcess | None = None
        self.agent: Agent | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def _child_args(self, port: int) -> list[str]:
        return [
            str(self.options.binary),
            "--model",
            str(self.options.model),
            "--alias",
            self.model_id,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.options.llama_args,
        ]

    async def start(self) -> BoundAddresses:
        addresses = await self.balancer.start()
        port = free_port(self.settings.ports())
        self.child = ChildProcess(self._child_args(port), name=f"llama-server:{self.model_id}")
        await self.child.start()
        self.agent = Agent(
            AgentOptions(
                local_llama_server=f"http://127.0.0.1:{port}",
                balancers=[addresses.management],
                cluster_token=self.options.cluster_token,
                name="local",
                poll_interval=0.1,
            )
        )
        self._tasks.append(asyncio.create_task(self.agent.run(), name="local-agent"))
        self._tasks.append(asyncio.create_task(self._supervise(port), name="supervise"))
        return addresses

    async def _supervise(self, port: int) -> None:
        """Restart llama-server when it exits on its own, with exponential backoff."""
        backoff = RESTART_BACKOFF_INITIAL
        while not self._stopping:
            assert self.child is not None
            started = time.monotonic()
            code = await self.child.wait()
            if self._stopping:
                return
            tail = "\n".join(self.child.tail(10))
            log.error(
                "llama-server exited unexpectedly code=%s; restarting in %.0f s; last lines:\n%s",
                code,
                backoff,
                tail,
            )
            if time.monotonic() - started > RESTART_BACKOFF_RESET_AFTER:
                backoff = RESTART_BACKOFF_INITIAL
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            if self._stopping:
                return
            self.child = ChildProcess(self._child_args(port), name=self.child.name)
            await self.child.start()

    async def stop(self) -> None:
        """Drain the balancer, then stop the agent and llama-server."""
        self._stopping = True
        await self.balancer.stop()
        if self.agent is not None:
            await self.agent.stop()
        for task in self._tasks:
            if task.get_name() == "supervise":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.child is not None:
            await self.child.stop(STOP_GRACE)
