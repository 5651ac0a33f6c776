"""The shape every system under test has: start, describe, say its version, stop."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from bench.context import BenchContext, wait_healthy
from bench.procs import ManagedProcess, free_port


@dataclass(frozen=True)
class Endpoint:
    """Where a started system takes requests.

    ``url`` is the system's front door; ``backend_url`` the llama-server behind it, so a
    workload can measure that llama-server directly, interleaved with the front door,
    for a paired baseline. For the direct system the two are the same.
    """

    url: str
    backend_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)


class System(abc.ABC):
    """One system under test. ``start`` may raise :class:`bench.context.StartupError`."""

    #: short id used on the command line and in file names
    name: str
    #: how the report names it
    label: str

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def unavailable(self, ctx: BenchContext) -> str | None:
        """Why this system can't run here (the report says so), or None."""
        return None

    @abc.abstractmethod
    async def start(self, ctx: BenchContext) -> Endpoint: ...

    @abc.abstractmethod
    def version(self, ctx: BenchContext) -> str: ...

    @abc.abstractmethod
    def setup(self, ctx: BenchContext) -> str:
        """One line for the report: how this system is configured."""

    def note(self, ctx: BenchContext) -> str | None:
        """A sentence for the report's versions section, if this system needs one."""
        return None

    def observations(self, ctx: BenchContext) -> list[str]:
        """Facts from this system's own logs after a run (retries, waits, errors)."""
        return []

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def spawn(self, proc: ManagedProcess) -> ManagedProcess:
        self.procs.append(proc.start())
        return proc


def llama_server_args(ctx: BenchContext, port: int) -> list[str]:
    """A single-model llama-server, as corral serve starts it (alias = file stem)."""
    return [
        str(ctx.llama_server),
        "--model",
        str(ctx.model),
        "--alias",
        ctx.model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *ctx.llama_args,
    ]


async def start_llama_server(system: System, ctx: BenchContext, name: str) -> str:
    """Start a plain llama-server for ``system``; return its base URL once healthy."""
    port = free_port()
    proc = system.spawn(ManagedProcess(name, llama_server_args(ctx, port), ctx.log_path(name)))
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(f"{url}/health", what=f"{name} /health", proc=proc)
    return url
