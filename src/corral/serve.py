"""``corral serve``: a balancer, a local agent and one llama-server in one process.

This is the one-machine way to start corral. The llama-server child gets a loopback
port from the configured range and its model's file stem as its alias; the agent
watches it and reports to the balancer in the same process over the same protocol a
remote agent uses, so what works here works across hosts. llama-server runs under a
:class:`~corral.supervisor.instance.SupervisedInstance`: if it exits unexpectedly it
is started again with exponential backoff (1 s doubling to 60 s) while requests wait
in the buffer, and after 5 failures in 5 minutes it is reported ``failed`` with its
exit code and last log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from corral.balancer import Balancer, BoundAddresses
from corral.config import Settings
from corral.control.agent import Agent, AgentOptions
from corral.supervisor.instance import SupervisedInstance, SupervisorOptions
from corral.supervisor.process import free_port

log = logging.getLogger(__name__)

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
        self.instance: SupervisedInstance | None = None
        self.agent: Agent | None = None
        self._agent_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None

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
        self.agent = Agent(
            AgentOptions(
                local_llama_server=f"http://127.0.0.1:{port}",
                balancers=[addresses.management],
                cluster_token=self.options.cluster_token,
                name="local",
                poll_interval=0.1,
                on_command=self._command,
            )
        )
        agent = self.agent
        self.instance = SupervisedInstance(
            self._child_args(port),
            f"http://127.0.0.1:{port}/health",
            name=f"llama-server:{self.model_id}",
            options=SupervisorOptions(startup_timeout=self.settings.startup_timeout),
            on_change=lambda sup: agent.set_supervisor_state(sup.as_dict()),
        )
        self.instance.start()
        self._agent_task = asyncio.create_task(agent.run(), name="local-agent")
        return addresses

    async def _command(self, command: str) -> tuple[bool, str]:
        """A balancer's command for our instance (the balancer drained it first)."""
        if command != "restart" or self.instance is None:
            return False, f"unknown command {command!r}"
        instance = self.instance
        self._restart_task = asyncio.create_task(instance.restart(), name="restart")
        return True, "restart started"

    async def stop(self) -> None:
        """Drain the balancer, then stop the agent and llama-server."""
        await self.balancer.stop()
        if self.agent is not None:
            await self.agent.stop()
        if self._agent_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._agent_task
        if self.instance is not None:
            await self.instance.stop()
