"""The launchers: ``corral balancer``, ``corral agent``, ``corral serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli.common import (
    _cluster_token,
    _err,
    _management_token,
    _run_service,
    settings_from,
)
from corral.config import Settings
from corral.tls import client_context

if TYPE_CHECKING:
    from corral.supervisor.managed import ManagedInstance, ManagedOptions
    from corral.supervisor.process import PortLease
    from corral.tls import ClientCertificate

log = logging.getLogger("corral")


def _balancer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "inference_addr": args.inference_addr,
        "management_addr": args.management_addr,
        "policy": args.policy,
        "pin_slots": True if args.pin_slots else None,
        "max_buffered_requests": args.max_buffered_requests,
        "buffered_request_timeout": args.buffered_request_timeout,
        "management_token_file": args.management_token_file,
        "cluster_token_file": args.cluster_token_file,
        "expose_slots": True if args.expose_slots else None,
        "default_model": args.default_model,
        "loading_notices": args.loading_notices,
        "statsd_addr": args.statsd_addr,
        "statsd_prefix": args.statsd_prefix,
        "log_dir": getattr(args, "log_dir", None),
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_ca": args.tls_ca,
        "tls_client_ca": args.tls_client_ca,
        "agent_auth": args.agent_auth,
    }


def _inner_agents(
    args: argparse.Namespace, settings: Any, balancer: Any, cluster_token: str
) -> list[Any]:
    """Agent options for each ``--local-llama-server`` of ``corral balancer``."""
    from corral.agent import AgentOptions

    key = settings.llama_server_api_key
    return [
        AgentOptions(
            local_llama_server=url.rstrip("/"),
            balancers=[balancer.agent_address],
            cluster_token=cluster_token,
            tls=balancer.agent_tls,
            upstream_tls=client_context(settings.tls_ca) if settings.tls_ca else None,
            llama_server_api_key=key.get_secret_value() if key else None,
            slot_source=args.slot_source or settings.slot_source,
        )
        for url in getattr(args, "local_llama_server", []) or []
    ]


def cmd_balancer(args: argparse.Namespace) -> int:
    from corral.agent import Agent
    from corral.balancer import Balancer
    from corral.observe.tracing import TracingError
    from corral.tokens import TokenError

    settings = settings_from(args, _balancer_overrides(args))
    try:
        management_token = _management_token(settings)
        cluster_token = _cluster_token(settings, create=True)
    except (TokenError, OSError) as exc:
        _err(str(exc))
        return 2
    for url in args.local_llama_server:
        if not url.startswith(("http://", "https://")):
            _err(f"--local-llama-server: expected an http:// or https:// URL, got {url!r}")
            return 2

    async def serve(stop: asyncio.Event) -> int:
        balancer = Balancer(
            settings, management_token=management_token, cluster_token=cluster_token
        )
        try:
            addresses = await balancer.start()
        except (OSError, TracingError) as exc:
            _err(str(exc))
            return 1
        scheme = balancer.scheme
        sys.stderr.write(
            f"corral balancer: inference {scheme}://{addresses.inference}  "
            f"management {scheme}://{addresses.management}  "
            f"dashboard {scheme}://{addresses.management}/dashboard\n"
        )
        agents = [
            Agent(options) for options in _inner_agents(args, settings, balancer, cluster_token)
        ]
        tasks = [asyncio.create_task(agent.run()) for agent in agents]
        for agent in agents:
            sys.stderr.write(f"corral balancer: watching {agent.options.local_llama_server}\n")
        await stop.wait()
        for agent in agents:
            await agent.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await balancer.stop()
        return 0

    return _run_service(serve)


def _add_balancer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file")
    parser.add_argument("--inference-addr", default=None, help="HOST:PORT (127.0.0.1:8080)")
    parser.add_argument("--management-addr", default=None, help="HOST:PORT (127.0.0.1:8085)")
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="serve both listeners over TLS with this PEM certificate (chain); reloaded when "
        "the file changes",
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="the PEM key of --tls-cert")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA bundle https:// llama-servers are verified against (the system's by default)",
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="mutual TLS: verify agents' client certificates against this PEM CA bundle",
    )
    parser.add_argument(
        "--agent-auth",
        default=None,
        choices=["token", "certificate", "both"],
        help="what lets an agent register: the cluster token (the default), a client "
        "certificate verified against --tls-client-ca, or both",
    )
    parser.add_argument(
        "--policy",
        default=None,
        choices=["least_busy", "round_robin", "random", "prefix"],
        help="placement policy (least_busy)",
    )
    parser.add_argument(
        "--pin-slots",
        action="store_true",
        default=None,
        help="with --policy prefix: pin requests to the slot holding their prefix (id_slot); "
        "only where this balancer is the llama-servers' one client",
    )
    parser.add_argument(
        "--max-buffered-requests",
        type=int,
        default=None,
        help="requests one model's buffer holds; 0 turns buffering off (30)",
    )
    parser.add_argument(
        "--buffered-request-timeout",
        type=float,
        default=None,
        help="seconds a request may wait in the buffer before a 504 (10)",
    )
    parser.add_argument("--management-token-file", type=Path, default=None)
    parser.add_argument("--cluster-token-file", type=Path, default=None)
    parser.add_argument(
        "--default-model",
        default=None,
        help="where a request goes that names no model or an unknown one (with one model "
        "served: that one; with several and none set: 400 or 404)",
    )
    parser.add_argument(
        "--expose-slots",
        action="store_true",
        help="serve the fleet's slots at GET /corral/slots (GET /slots is llama-server's own)",
    )
    parser.add_argument(
        "--loading-notices",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="streaming chat requests that wait for their model get reasoning_content "
        "notices (loading X, unloading Y, ready) before its answer (off)",
    )
    parser.add_argument(
        "--statsd-addr", default=None, help="HOST:PORT to push StatsD gauges to every second"
    )
    parser.add_argument("--statsd-prefix", default=None, help="StatsD name prefix (corral)")


def _agent_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``corral agent``'s flags set (None: not given)."""
    return {
        "balancers": args.balancer or None,
        "local_llama_server": args.local_llama_server,
        "external_llama_server": args.external_llama_server,
        "llama_server_host": args.llama_server_host,
        "slot_source": args.slot_source,
        "agent_name": args.name,
        "balancer_dns_interval": args.balancer_dns_interval,
        "tls_ca": args.tls_ca,
        "tls_client_cert": args.tls_client_cert,
        "tls_client_key": args.tls_client_key,
        "cluster_token_file": args.cluster_token_file,
        "log_dir": args.log_dir,
    }


def agent_tls(settings: Any) -> ClientCertificate:
    """What an agent dials balancers with: their CA (``tls_ca``, else the system's) and,
    for mutual TLS, its client certificate (``tls_client_cert``/``tls_client_key``),
    reloaded before a connection when its files changed."""
    from corral.tls import ClientCertificate

    return ClientCertificate(settings.tls_ca, settings.tls_client_cert, settings.tls_client_key)


def cmd_agent(args: argparse.Namespace) -> int:
    from corral.agent import Agent, AgentOptions
    from corral.tokens import TokenError

    settings = settings_from(args, _agent_overrides(args))
    if args.models_dir:
        return _agent_hosting(args, settings)
    owns = bool(args.model) or (bool(settings.models) and not settings.local_llama_server)
    if bool(settings.local_llama_server) == owns:
        _err(
            "an agent either watches a running llama-server (--local-llama-server URL) "
            "or starts and owns llama-servers (--model FILE.gguf [-- llama-server args], "
            "or a `models` table in --config); give one"
        )
        return 2
    if not settings.balancers:
        _err("an agent reports to balancers: give --balancer HOST:PORT (repeatable)")
        return 2
    try:
        balancers_tls = agent_tls(settings)
    except (OSError, ssl.SSLError) as exc:
        _err(f"cannot load the agent's TLS files (tls_ca, tls_client_cert/key): {exc}")
        return 2
    try:
        cluster_token = _cluster_token(settings, create=False)
    except (TokenError, OSError) as exc:
        _err(str(exc))
        return 2
    if owns:
        return _agent_owning(args, settings, cluster_token, balancers_tls)
    assert settings.local_llama_server is not None
    api_key = settings.llama_server_api_key
    options = AgentOptions(
        local_llama_server=settings.local_llama_server,
        balancers=list(settings.balancers),
        cluster_token=cluster_token,
        external_llama_server=settings.external_llama_server,
        slot_source=settings.slot_source,
        llama_server_api_key=api_key.get_secret_value() if api_key else None,
        balancer_dns_interval=settings.balancer_dns_interval,
        tls=balancers_tls.context,
        tls_reload=balancers_tls.reload_if_changed,
        upstream_tls=client_context(settings.tls_ca) if settings.tls_ca else None,
    )
    if settings.agent_name:
        options.name = settings.agent_name

    async def serve(stop: asyncio.Event) -> int:
        agent = Agent(options)
        task = asyncio.create_task(agent.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        await agent.stop()
        await task
        stopper.cancel()
        return 0

    return _run_service(serve)


def _agent_hosting(args: argparse.Namespace, settings: Settings) -> int:
    """``corral agent --models-dir DIR``: a model host. It offers the models found there
    (and the ``models`` table's) to the balancers and starts one when a balancer asks."""
    from corral.catalog.catalog import Catalog
    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server
    from corral.supervisor.host_agent import HostAgent, HostAgentOptions
    from corral.tokens import TokenError

    if args.model or settings.local_llama_server:
        _err("--models-dir makes the agent a model host: give no --model or --local-llama-server")
        return 2
    if not settings.balancers:
        _err("an agent reports to balancers: give --balancer HOST:PORT (repeatable)")
        return 2
    for folder in args.models_dir:
        if not Path(folder).is_dir():
            _err(f"--models-dir {folder}: not a folder")
            return 2
    try:
        balancers_tls = agent_tls(settings)
        cluster_token = _cluster_token(settings, create=False)
        binary = find_llama_server(args.llama_server or settings.llama_server).path
    except (OSError, ssl.SSLError, TokenError, LlamaServerNotFound) as exc:
        _err(str(exc))
        return 2
    try:
        memory_limit = parse_size(args.max_memory) if args.max_memory else None
    except ValueError as exc:
        _err(f"--max-memory: {exc}")
        return 2
    catalog = Catalog(list(args.models_dir), dict(settings.models))
    catalog.rescan()
    for problem in catalog.problems:
        log.warning("catalog problem %s", problem)
    options = HostAgentOptions(
        balancers=list(settings.balancers),
        cluster_token=cluster_token,
        binary=binary,
        max_instances=args.max_instances or settings.max_instances or 4,
        llama_args=list(settings.llama_args),
        tls=balancers_tls.context,
        memory_limit=memory_limit,
    )
    if settings.agent_name:
        options.name = settings.agent_name

    def make(key: str, model: Any, aliases: list[str], llama_args: list[str]) -> tuple[Any, Any]:
        return _owned_instance(
            settings, binary, model.path, key, aliases, llama_args, cluster_token, balancers_tls
        )

    async def serve(stop: asyncio.Event) -> int:
        agent = HostAgent(catalog, options, make)
        task = asyncio.create_task(agent.run())
        log.info(
            "model host %s offers %d models to %s",
            options.name,
            len(catalog.models),
            ", ".join(options.balancers),
        )
        await stop.wait()
        await agent.stop()
        await task
        return 0

    return _run_service(serve)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip


def parse_size(text: str) -> int:
    """``24GiB``, ``1500MiB``, ``8e9`` -> bytes."""
    import re

    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 24GiB, 1500MiB, or bytes)")
    value = int(float(match[1]) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r}: must be more than 0")
    return value


def _llama_args(raw: list[str]) -> list[str]:
    return raw[1:] if raw[:1] == ["--"] else list(raw)


def _agent_owning(
    args: argparse.Namespace,
    settings: Settings,
    cluster_token: str,
    balancers_tls: ClientCertificate | None = None,
) -> int:
    """``corral agent --model M`` (one llama-server) or ``--config`` with a ``models``
    table (one per model): start, supervise and report each."""

    from yarl import URL

    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server
    from corral.supervisor.managed import check_reserved

    wanted: list[tuple[str, Path, list[str], list[str]]] = []  # id, file, args, aliases
    if args.model:
        model = Path(args.model)
        wanted.append((model.stem, model, _llama_args(args.llama_args), []))
    else:
        for model_id, config in settings.models.items():
            if config.cmd is not None:
                _err(
                    f"models.{model_id}.cmd: models started from a command template run "
                    "under `corral serve` only, so far"
                )
                return 2
            if config.path is None:
                _err(f"models.{model_id}.path: an agent needs the GGUF file to start")
                return 2
            wanted.append((model_id, config.path, list(config.args), list(config.aliases)))
    external = settings.external_llama_server
    if external is not None and len(wanted) > 1 and URL(external).explicit_port is not None:
        _err(
            "external_llama_server names one port, and this agent starts "
            f"{len(wanted)} llama-servers: give it without a port (each server's own is used)"
        )
        return 2
    try:
        binary = find_llama_server(args.llama_server or settings.llama_server).path
        for model_id, path, extra, _ in wanted:
            if not path.is_file():
                raise ValueError(f"model {model_id}: file {path} does not exist")
            check_reserved(extra)
    except (ValueError, LlamaServerNotFound) as exc:
        _err(str(exc))
        return 2

    if balancers_tls is None:
        balancers_tls = agent_tls(settings)

    async def serve(stop: asyncio.Event) -> int:
        managed: list[ManagedInstance] = []
        for model_id, path, extra, aliases in wanted:
            instance, _ = _owned_instance(
                settings, binary, path, model_id, aliases, extra, cluster_token, balancers_tls
            )
            await instance.start()
            managed.append(instance)
        await stop.wait()
        await asyncio.gather(*(instance.stop() for instance in managed))  # and their leases
        return 0

    return _run_service(serve)


def _owned_instance(
    settings: Settings,
    binary: Path,
    model: Path,
    model_id: str,
    aliases: list[str],
    llama_args: list[str],
    cluster_token: str,
    tls: ClientCertificate | None,
) -> tuple[ManagedInstance, PortLease]:
    """One llama-server the agent owns, on a port leased for it (released when it stops)."""
    from corral.supervisor.managed import ManagedInstance
    from corral.supervisor.process import lease_port
    from corral.tokens import state_dir

    lease = lease_port(settings.ports(), state_dir() / "ports")
    options = owned_options(
        settings,
        binary=binary,
        model=model,
        model_id=model_id,
        aliases=aliases,
        llama_args=llama_args,
        port=lease.port,
        lease=lease,
        cluster_token=cluster_token,
        tls=tls,
    )
    return ManagedInstance(options), lease


def owned_options(
    settings: Settings,
    *,
    binary: Path,
    model: Path,
    model_id: str,
    aliases: list[str],
    llama_args: list[str],
    port: int,
    cluster_token: str,
    lease: PortLease | None = None,
    tls: ClientCertificate | None = None,
) -> ManagedOptions:
    """How ``corral agent`` starts, supervises and reports one llama-server of its own
    (``--model``, or each entry of its ``models`` table), from its settings; ``tls``:
    what it verifies balancers with (:func:`agent_tls`, loaded once)."""
    import socket

    from corral.supervisor.instance import supervisor_options
    from corral.supervisor.managed import ManagedOptions

    cert, key = settings.tls_cert, settings.tls_key
    https = settings.llama_server_tls and cert is not None and key is not None
    return ManagedOptions(
        binary=binary,
        model=model,
        model_id=model_id,
        aliases=aliases,
        port=port,
        lease=lease,
        balancers=list(settings.balancers),
        cluster_token=cluster_token,
        host=settings.llama_server_host,
        external_url=settings.external_llama_server,
        drain_timeout=settings.drain_timeout,
        tls_files=(cert, key) if https and cert is not None and key is not None else None,
        llama_args=llama_args,
        agent_name=settings.agent_name or socket.gethostname(),
        balancer_dns_interval=settings.balancer_dns_interval,
        tls=tls.context if tls is not None else None,
        tls_reload=tls.reload_if_changed if tls is not None else None,
        poll_interval=0.25,
        supervisor=supervisor_options(settings),
        log_dir=settings.log_dir,
    )


def _needs_llama_server(settings: Settings, model: Path | None, models_dirs: list[Path]) -> bool:
    """Whether ``serve`` may start llama-server: not when the config's models are all
    command templates and nothing else (``--model``, model folders) adds GGUF models."""
    if model is not None or models_dirs or settings.models_dirs or not settings.models:
        return True
    return any(config.cmd is None for config in settings.models.values())


def cmd_serve(args: argparse.Namespace) -> int:
    import secrets

    from corral.serve import LocalServe, ServeOptions, build_catalog
    from corral.supervisor.binary import (
        LlamaServerNotFound,
        cached_binary,
        find_llama_server,
        ui_beside,
    )
    from corral.tokens import TokenError

    overrides = _balancer_overrides(args)
    overrides["max_instances"] = args.max_instances
    settings = settings_from(args, overrides)
    model = Path(args.model) if args.model else None
    if model is not None and not model.is_file():
        _err(f"model file {model} does not exist")
        return 2
    for folder in args.models_dir:
        if not folder.is_dir():
            _err(f"--models-dir {folder}: not a folder")
            return 2
    binary: Path | None = None
    try:
        binary = find_llama_server(args.llama_server or settings.llama_server).path
    except LlamaServerNotFound as exc:
        if _needs_llama_server(settings, model, list(args.models_dir)):
            _err(str(exc))
            return 2
        log.info("no llama-server found; every model runs its own command: %s", exc)
    try:
        management_token = _management_token(settings)
        cluster_token = settings.resolved_cluster_token() or secrets.token_urlsafe(32)
    except (TokenError, OSError) as exc:
        _err(str(exc))
        return 2
    extra = _llama_args(args.llama_args)
    if extra and model is None:
        _err("llama-server arguments after -- apply to --model; give --model, or set "
             "llama_args (every model) or models.ID.args in --config")  # fmt: skip
        return 2
    options = ServeOptions(
        model=model,
        binary=binary,
        llama_args=extra,
        models_dirs=list(args.models_dir),
        management_token=management_token,
        cluster_token=cluster_token,
        log_dir=settings.log_dir,
    )
    try:
        LocalServe.check_args(extra)
    except ValueError as exc:
        _err(str(exc))
        return 2
    catalog = None
    if model is None:
        catalog = build_catalog(settings, options)
        if catalog.dirs:
            catalog.rescan()
        if not catalog.models:
            tiny = _offer_tiny(catalog)
            if tiny is not None:
                options.model = tiny
                catalog = None  # the catalog has to include it: build it anew

    async def serve(stop: asyncio.Event) -> int:
        local = LocalServe(settings, options, catalog)
        if args.config is not None:
            local.config_file = Path(args.config)
        try:
            addresses = await local.start()
        except (OSError, RuntimeError) as exc:
            _err(str(exc))
            await local.stop()
            return 1
        names = ", ".join(local.models) or "no models yet (watching the model folders)"
        web = local.balancer.scheme
        sys.stderr.write(
            f"corral serve: {names} at {web}://{addresses.inference}/v1  "
            f"(management {web}://{addresses.management}, "
            f"dashboard {web}://{addresses.management}/dashboard)\n"
        )
        if binary is not None and ui_beside(binary) is not None:
            sys.stderr.write(f"llama-server's web UI: {web}://{addresses.inference}/\n")
        elif binary is not None and binary == cached_binary():
            sys.stderr.write(
                "llama-server's web UI is not built: `corral llama-server install` builds "
                "it when npm is there\n"
            )
        await stop.wait()
        await local.stop()
        return 0

    return _run_service(serve)


def _offer_tiny(catalog: Any) -> Path | None:
    """No model anywhere: offer (on a terminal) to write the tiny test model."""
    from corral.catalog.tiny import make_tiny_model

    where = ", ".join(str(d) for d in catalog.dirs) or "(no folders)"
    target = Path.home() / ".cache" / "corral" / "models" / "tiny.gguf"
    hint = (
        f"corral serve: no GGUF models found in {where}. Give --model FILE.gguf or "
        f"--models-dir DIR, or create a tiny test model with `corral models make-tiny "
        f"{target}`."
    )
    if not sys.stdin.isatty():
        sys.stderr.write(hint + " Serving nothing until a model appears.\n")
        return None
    sys.stderr.write(hint + "\n")
    answer = input(f"Create the tiny test model at {target} and serve it? [Y/n] ").strip()
    if answer.lower() not in ("", "y", "yes"):
        return None
    return make_tiny_model(target) if not target.is_file() else target
