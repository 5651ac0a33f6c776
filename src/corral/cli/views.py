"""What reads a running corral or a catalog: ``status``, ``top``, ``models ...``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli.common import (
    _err,
    management_endpoint,
    settings_from,
)
from corral.config import Settings, check_file

if TYPE_CHECKING:
    from rich.console import RenderableType


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
        {
            "management_addr": args.management_addr,
            "management_token_file": args.token_file,
            "tls_ca": getattr(args, "tls_ca", None),
        },
    )
    token = _status_token(settings)
    if not token:
        _err(
            "no management token: set CORRAL_MANAGEMENT_TOKEN or --token-file (a local "
            "balancer writes one to ~/.local/state/corral/management-token)"
        )
        return None
    url, tls = management_endpoint(settings, settings.management_addr, "/api/v1/fleet")
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    hosts_url, _ = management_endpoint(settings, settings.management_addr, "/api/v1/hosts")
    hosts_request = urllib.request.Request(hosts_url, headers=headers)

    def read() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=10, context=tls) as response:
                fleet: dict[str, Any] = json.loads(response.read())
            try:  # the machines models run on; a bare balancer (501) or an older one has none
                with urllib.request.urlopen(hosts_request, timeout=10, context=tls) as response:
                    fleet["hosts"] = json.loads(response.read())["hosts"]
            except (OSError, ValueError, KeyError):
                pass
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
                   "restarts", "devices", "problem"):  # fmt: skip
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
            _devices(supervisor),
            "; ".join(problems)[:60],
        )
    buffered = {m: n for m, n in (fleet.get("buffered") or {}).items() if n}
    waiting = ", ".join(f"{m}: {n}" for m, n in buffered.items()) or "none"
    summary = Text(
        f"models: {', '.join(fleet.get('models', [])) or 'none'}   "
        f"agents: {len(agents)}   buffered requests: {waiting}"
    )
    hosts = fleet.get("hosts")
    if not hosts:
        return Group(table, summary)
    machines = Table(title="hosts", title_justify="left")
    for column in ("host", "memory free", "servers", "running", "can start", "devices"):
        machines.add_column(column)
    for host in hosts:
        servers = host.get("servers") or []
        machines.add_row(
            host["name"] if host["id"] != "local" else f"{host['name']} (this one)",
            f"{_human_bytes(host['memory_available'])} of {_human_bytes(host['memory_total'])}",
            f"{len(servers)}/{host['max_instances']}",
            ", ".join(f"{s['key']} ({s['state']})" for s in servers) or "-",
            ", ".join(host.get("models") or []) or "-",
            _devices({"devices": host.get("devices") or []}),
        )
    return Group(table, machines, summary)


def _devices(supervisor: dict[str, Any]) -> str:
    """The accelerators a supervised server's binary can use: ``CUDA0 (NVIDIA L4, 21.9
    of 22.5 GiB free)``; ``cpu`` when it reports none; ``-`` when nobody supervises it."""
    if not supervisor:
        return "-"
    devices = supervisor.get("devices") or []
    if not devices:
        return "cpu"
    return "; ".join(
        f"{d['name']} ({d['description']}, {d['free_mib'] / 1024:.1f} of "
        f"{d['total_mib'] / 1024:.1f} GiB free)"
        for d in devices
    )


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
    url, tls = management_endpoint(settings, addr, "/api/v1/fleet")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10, context=tls) as response:
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

    from corral.catalog.catalog import Catalog

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

    from corral.catalog.catalog import Catalog
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
