"""``corral serve``: a balancer, a local agent and one llama-server in one process.

This is the one-machine way to start corral. The llama-server child gets a loopback
port from the configured range and its model's file stem as its alias; a
:class:`~corral.supervisor.managed.ManagedInstance` supervises it and its agent
reports it to the balancer in the same process over the same protocol a remote agent
uses, so what works here (restart, reconfigure, logs) works across hosts. If
llama-server exits unexpectedly it is started again with exponential backoff (1 s
doubling to 60 s) while requests wait in the buffer; after 5 failures in 5 minutes it
is reported ``failed`` with its exit code and last log lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from corral.balancer import Balancer, BoundAddresses
from corral.config import Settings
from corral.control.tokens import state_dir
from corral.supervisor.managed import ManagedInstance, ManagedOptions, check_reserved
from corral.supervisor.process import PortLease, lease_port

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model: Path
    binary: Path
    management_token: str
    cluster_token: str
    llama_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None


class LocalServe:
    """Balancer + managed llama-server on one event loop."""

    @staticmethod
    def check_args(llama_args: list[str]) -> None:
        """Refuse llama-server arguments corral must own (address, model, alias)."""
        check_reserved(llama_args)

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
        self.instance: ManagedInstance | None = None
        self.lease: PortLease | None = None

    async def start(self) -> BoundAddresses:
        addresses = await self.balancer.start()
        self.instance = ManagedInstance(
            ManagedOptions(
                binary=self.options.binary,
                model=self.options.model,
                port=(lease := self._port()).port,
                lease=lease,
                balancers=[addresses.management],
                cluster_token=self.options.cluster_token,
                llama_args=self.options.llama_args,
                # slot use is known exactly from the balancer's own leases; the poll
                # only catches other clients' use, and the supervisor wakes it on change
                poll_interval=0.5,
                supervisor=self.settings.supervisor_options(),
                log_dir=self.options.log_dir,
            )
        )
        await self.instance.start()
        return addresses

    def _port(self) -> PortLease:
        self.lease = lease_port(self.settings.ports(), state_dir() / "ports")
        return self.lease

    async def stop(self) -> None:
        """Drain the balancer, then stop the agent and llama-server."""
        await self.balancer.stop()
        if self.instance is not None:
            await self.instance.stop()  # releases its port lease too
        elif self.lease is not None:
            self.lease.release()
