"""A llama-server corral owns: a supervised process plus the agent that reports it.

Used by ``corral serve`` (reporting to the balancer in the same process) and by
``corral agent --model`` (reporting to remote balancers). The agent carries the
balancers' commands to the supervisor: ``restart``, ``reconfigure`` (new extra
llama-server arguments; the balancer has drained the instance first) and ``logs``.

With ``command`` set the process is not llama-server but a model's command template
(:mod:`corral.template`), filled in again at every start (a moved port
included); the same supervisor runs it, and its agent watches it as a ``generic``
server: ``health_path`` for readiness, ``slots`` as its slot count.

A llama-server binary with a built web UI beside it (``ui/index.html``, where
``corral llama-server install`` puts it for corral's own build, which has no UI
compiled in) gets ``--path`` to that folder, so the page at ``/`` works, unless the
user chose the static path (``--path`` in the arguments, ``LLAMA_ARG_STATIC_PATH`` in
the environment) or turned the UI off (``--no-webui``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from corral.agent import Agent, AgentOptions
from corral.config import SlotSource
from corral.supervisor.binary import ui_beside
from corral.supervisor.devices import list_devices
from corral.supervisor.flags import FlagError, api_key_of, check_llama_args, sleeps
from corral.supervisor.instance import SupervisedInstance, SupervisorOptions
from corral.supervisor.process import PortLease, lease_port
from corral.template import substitute
from corral.tls import self_context
from corral.tokens import state_dir

log = logging.getLogger(__name__)

#: llama-server arguments corral sets itself; the command line may not repeat them.
RESERVED_ARGS = frozenset(
    {"--host", "--port", "-m", "--model", "--alias", "-a", "--ssl-key-file", "--ssl-cert-file"}
)


def check_reserved(llama_args: list[str]) -> None:
    """Refuse command-line llama-server arguments corral must own."""
    reserved = sorted(a for a in llama_args if a.split("=")[0] in RESERVED_ARGS)
    if reserved:
        hint = (
            " (llama_server_tls serves https with tls_cert and tls_key)"
            if any(a.startswith("--ssl-") for a in reserved)
            else ""
        )
        raise ValueError(
            f"corral sets {', '.join(reserved)} itself; remove them from the llama-server "
            f"arguments{hint}"
        )


def static_path_args(
    binary: Path, llama_args: Sequence[str], env: Mapping[str, str] | None = None
) -> list[str]:
    """``["--path", UI]`` when ``binary`` has a built web UI beside it and the user did
    not choose a static path or turn the UI off (see the module doc); else ``[]``.

    ``env`` is the server's extra environment; corral's own is inherited too. Both are
    checked because llama-server lets a flag win over its ``LLAMA_ARG_*`` variable.
    """
    ui = ui_beside(binary)
    if ui is None:
        return []
    if any(a.split("=", 1)[0] in ("--path", "--no-webui") for a in llama_args):
        return []
    if "LLAMA_ARG_STATIC_PATH" in {**os.environ, **(env or {})}:
        return []
    return ["--path", str(ui)]


#: Seconds between reads of ``/slots`` while a stopping server drains.
DRAIN_POLL = 0.2


def _polled(host: str) -> str:
    """Where the agent reads a server listening on ``host``: loopback for every address."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _with_port(url: str | None, port: int, *, https: bool = False) -> str | None:
    """``url`` with ``port`` when it names none (``http://10.0.0.5`` -> ``...:8081``),
    and over https when the server speaks only that (``https``) and the URL says http."""
    if url is None:
        return None
    parsed = URL(url)
    if https and parsed.scheme == "http":
        parsed = parsed.with_scheme("https")
    if parsed.explicit_port is None:
        parsed = parsed.with_port(port)
    elif not https or url.startswith("https"):
        return url
    return str(parsed).rstrip("/")


@dataclass
class ManagedOptions:
    binary: Path | None
    """llama-server; unused (may be None) with ``command``."""
    model: Path | None
    """The GGUF file; None only with ``command`` (and then ``model_id`` is required)."""
    port: int
    balancers: list[str]
    cluster_token: str
    host: str = "127.0.0.1"
    """The address llama-server listens on; the agent polls it there (on loopback when
    it listens on every address)."""
    external_url: str | None = None
    """The URL balancers dial, when not the polled one; without a port, :attr:`port`'s."""
    llama_args: list[str] = field(default_factory=list)
    model_id: str | None = None
    """Name clients use; the model file's stem by default."""
    aliases: list[str] = field(default_factory=list)
    """Other names clients may use for it."""
    agent_name: str = "local"
    poll_interval: float = 0.5
    balancer_dns_interval: float = 15.0
    """How often the agent looks balancers given by name up again."""
    tls: ssl.SSLContext | None = None
    """What the agent verifies ``https://`` balancers with (None: the system's store)."""
    tls_reload: Callable[[], object] | None = None
    """Reloads a rotated client certificate into ``tls`` (see :class:`AgentOptions`)."""
    supervisor: SupervisorOptions = field(default_factory=SupervisorOptions)
    log_dir: Path | None = None
    """Where to keep rotating log files (NAME.log, NAME.log.1, ...); None: memory only."""
    lease: PortLease | None = None
    """The lease on ``port``, released when the instance moves or stops."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for llama-server."""
    command: list[str] | None = None
    """A command template to run instead of llama-server (``binary``, ``model`` and
    ``llama_args`` are then unused but for ``${model_path}``)."""
    template_values: dict[str, str] = field(default_factory=dict)
    """Values of ``${model_path}`` and ``${mmproj}`` for ``command``, when it has them."""
    health_path: str = "/health"
    """With ``command``: the path that answers 200 once the server is ready."""
    slots: int = 4
    """With ``command``: requests the server takes at once."""
    tls_files: tuple[Path, Path] | None = None
    """A certificate (chain) and key: llama-server then serves https with them
    (``--ssl-cert-file``/``--ssl-key-file``; ``llama_server_tls``), and the agent and the
    supervisor read it over https, trusting that certificate."""
    drain_timeout: float = 0.0
    """At a stop, after deregistering: seconds the requests already sent may take to
    finish (``corral agent``: ``drain_timeout``); 0 waits for none (``corral serve``'s
    host drains through its scheduler before it stops an instance)."""


class ManagedInstance:
    """Start, supervise and report one llama-server; see the module doc."""

    def __init__(self, options: ManagedOptions) -> None:
        check_reserved(options.llama_args)
        if options.command is None and options.binary is None:
            raise ValueError("llama-server's binary is required, except for a command template")
        if options.model is None and (options.command is None or not options.model_id):
            raise ValueError(
                "a model file is required, except for a command template with a model id"
            )
        self.options = options
        self.model_id = options.model_id or (options.model.stem if options.model else "")
        self.llama_args = list(options.llama_args)
        generic = options.command is not None
        files = options.tls_files if not generic else None
        self.scheme = "https" if files is not None else "http"
        own = self_context(files[0]) if files is not None else None
        """What the agent and the supervisor verify the server with: its own certificate."""
        url = f"{self.scheme}://{_polled(options.host)}:{options.port}"
        self.agent = Agent(
            AgentOptions(
                local_llama_server=url,
                external_llama_server=_with_port(
                    options.external_url, options.port, https=self.scheme == "https"
                ),
                balancers=list(options.balancers),
                cluster_token=options.cluster_token,
                name=options.agent_name,
                poll_interval=options.poll_interval,
                balancer_dns_interval=options.balancer_dns_interval,
                tls=options.tls,
                tls_reload=options.tls_reload,
                on_command=self.command,
                extra_aliases=list(options.aliases),
                model_name=self.model_id,
                server_kind="generic" if generic else "llama-server",
                health_path=options.health_path if generic else "/health",
                slots=options.slots,
                slot_source=self._slot_source(),
                llama_server_api_key=None if generic else api_key_of(self.llama_args, options.env),
                upstream_tls=own,
            )
        )
        program = Path(options.command[0]).name if options.command else "llama-server"
        self.supervisor = SupervisedInstance(
            self._args(),
            url + self.health_path,
            name=f"{program}:{self.model_id}",
            options=options.supervisor,
            on_change=lambda sup: self.agent.set_supervisor_state(sup.report()),
            log_path=(
                options.log_dir / f"{self.model_id}-{options.port}.log"
                if options.log_dir is not None
                else None
            ),
            env=options.env,
            tls=own,
        )
        self._agent_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._stopped = False
        """Set by :meth:`stop`; a start still listing devices then starts nothing."""

    def _slot_source(self) -> SlotSource:
        """``balancer`` for a llama-server that sleeps when idle: reading its /slots
        would keep it awake (see :attr:`AgentOptions.slot_source`)."""
        return "balancer" if sleeps(self.llama_args, self.options.env) else "slots"

    @property
    def health_path(self) -> str:
        return self.options.health_path if self.options.command is not None else "/health"

    def _args(self) -> list[str]:
        if self.options.command is not None:
            values = {
                **self.options.template_values,
                "host": self.options.host,
                "port": str(self.options.port),
                "model_id": self.model_id,
            }
            return substitute(self.options.command, values)
        assert self.options.model is not None and self.options.binary is not None
        return [
            str(self.options.binary),
            "--model", str(self.options.model),
            "--alias", self.model_id,
            "--host", self.options.host,
            "--port", str(self.options.port),
            *self.llama_args,
            *self._tls_args(),
            *static_path_args(self.options.binary, self.llama_args, self.options.env),
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        if self.options.tls_files is None:
            return []
        cert, key = self.options.tls_files
        return ["--ssl-cert-file", str(cert), "--ssl-key-file", str(key)]

    async def start(self) -> None:
        if self.options.command is None and self.options.binary is not None:
            env = {**os.environ, **self.options.env}  # as the server will see it
            devices = await list_devices(self.options.binary, env)
            if self._stopped:
                return  # stopped while it listed devices: start nothing after a stop
            self.supervisor.devices = devices
        if self._stopped:
            return
        self.supervisor.start()
        self._agent_task = asyncio.create_task(self.agent.run(), name=f"agent-{self.model_id}")

    async def stop(self) -> None:
        """Deregister from the balancers, let the requests already sent finish (at most
        ``drain_timeout``), then stop llama-server (SIGTERM, SIGKILL). A :meth:`start`
        still under way starts nothing after it."""
        self._stopped = True
        await self.agent.stop()
        if self._agent_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._agent_task
        if self._restart_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        child = self.supervisor.child
        running = child is not None and child.running()
        if self.options.drain_timeout > 0 and self.options.command is None and running:
            await self._drain(self.options.drain_timeout)
        await self.supervisor.stop()
        if self.options.lease is not None:
            self.options.lease.release()
            self.options.lease = None

    async def _drain(self, limit: float) -> bool:
        """Wait until llama-server's ``/slots`` shows no slot processing (the balancers
        no longer send it anything: the agent deregistered), at most ``limit`` seconds.
        False when it timed out; a server without ``/slots`` (``--no-slots``) or one that
        does not answer is not waited for."""
        headers = {}
        key = api_key_of(self.llama_args, self.options.env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.agent.local_url + "/slots"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        timeout = aiohttp.ClientTimeout(total=2.0)
        connector = aiohttp.TCPConnector(ssl=self.supervisor.tls or True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                try:
                    async with session.get(url, headers=headers) as response:
                        if response.status != 200:
                            return True
                        slots = await response.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    return True
                busy = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
                if not busy:
                    return True
                if loop.time() >= deadline:
                    log.warning(
                        "stopping model=%s with %d request(s) still running after %.0f s",
                        self.model_id,
                        busy,
                        limit,
                    )
                    return False
                log.info("draining model=%s busy_slots=%d", self.model_id, busy)
                await asyncio.sleep(DRAIN_POLL)

    # -- commands from balancers --------------------------------------------------------

    async def command(self, command: str, data: dict[str, Any]) -> dict[str, Any]:
        if command == "restart":
            self._begin_restart()
            return {"ok": True, "detail": "restart started"}
        if command == "reconfigure":
            args = self.llama_args
            if "args" in data and self.options.command is not None:
                return {
                    "ok": False,
                    "detail": "this model runs a command template, not llama-server: change "
                    f"models.{self.model_id}.cmd and reload the config instead",
                }
            if "args" in data:
                try:
                    args = check_llama_args(data["args"])
                except FlagError as exc:  # checked by the balancer too: never trust the wire
                    return {"ok": False, "detail": f"refused llama-server arguments: {exc}"}
            if "port" in data:
                error = self._move_to(data["port"])
                if error:
                    return {"ok": False, "detail": error}
            log.info("reconfigure model=%s port=%s args=%s", self.model_id, self.options.port, args)
            self.llama_args = args
            self.agent.options.slot_source = self._slot_source()
            self.supervisor.args = self._args()
            self._begin_restart()
            return {"ok": True, "detail": "restarting with new settings", "args": args}
        if command == "logs":
            output = self.supervisor.output
            if "since" in data:
                lines, cursor = output.since(int(data["since"]))
            else:
                lines, cursor = output.tail(int(data.get("lines", 200))), output.count
            return {"ok": True, "lines": lines, "cursor": cursor}
        return {"ok": False, "detail": f"unknown command {command!r}"}

    def _move_to(self, port: object) -> str | None:
        """Lease ``port`` for the next start; an error message if it can't be had."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return "port must be a whole number from 1 to 65535"
        if port == self.options.port:
            return None
        try:
            lease = lease_port(range(port, port + 1), state_dir() / "ports")
        except RuntimeError:
            return f"port {port} is in use or held by another corral process"
        if self.options.lease is not None:
            self.options.lease.release()
        self.options.lease, self.options.port = lease, port
        url = f"{self.scheme}://{_polled(self.options.host)}:{port}"
        self.agent.local_url = url
        external = self.options.external_url
        if external is None:
            self.agent.url = url
        elif URL(external).explicit_port is None:  # balancers dial the new port too
            self.agent.url = str(URL(self.agent.url).with_port(port)).rstrip("/")
        self.supervisor.health_url = url + self.health_path
        return None

    def _begin_restart(self) -> None:
        # answer the balancer at once; the restart (SIGTERM, wait, start) runs on
        self._restart_task = asyncio.create_task(self.supervisor.restart(), name="restart")
