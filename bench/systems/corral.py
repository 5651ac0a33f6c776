"""corral serve: balancer + agent + its own supervised llama-server, as a user runs it."""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shlex
import sys
import urllib.request
from pathlib import Path

from bench.context import REPO_ROOT, BenchContext, StartupError, http_json, wait_healthy, wait_until
from bench.procs import ManagedProcess, free_port, run_text
from bench.stats import percentile
from bench.systems.base import Endpoint, System

ACCESS_WAIT = re.compile(r"corral\.access .*? buffer_wait=([0-9.]+)")
UPSTREAM_FAILED = re.compile(r"upstream failed before first byte .*? error=(\w+)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def corral_command() -> list[str]:
    """The ``corral`` entry point of the interpreter running the bench."""
    script = Path(sys.executable).parent / "corral"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "corral.cli"]


def serve_args(
    ctx: BenchContext,
    inference: int,
    management: int,
    log_dir: Path | None = None,
    command: list[str] | None = None,
) -> list[str]:
    """``corral serve`` for the bench's model on loopback ports (``--log-dir`` if given)."""
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    return [
        *(command or corral_command()),
        "serve",
        "--model",
        str(ctx.model),
        "--llama-server",
        str(ctx.llama_server),
        "--inference-addr",
        f"127.0.0.1:{inference}",
        "--management-addr",
        f"127.0.0.1:{management}",
        *logs,
        "--",
        *ctx.llama_args,
    ]


def serve_env(ctx: BenchContext, token: str) -> dict[str, str]:
    """Environment for ``corral serve``: its management token and a state dir of the run's."""
    state_dir = ctx.run_dir / "corral-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    return {"CORRAL_MANAGEMENT_TOKEN": token, "CORRAL_STATE_DIR": str(state_dir)}


class Corral(System):
    name = "corral"
    label = "corral serve"

    def command(self) -> list[str]:
        """How this system runs corral's CLI."""
        return corral_command()

    def extra_env(self) -> dict[str, str]:
        return {}

    async def start(self, ctx: BenchContext) -> Endpoint:
        inference, management = free_port(), free_port()
        token = secrets.token_urlsafe(24)
        args = serve_args(ctx, inference, management, command=self.command())
        env = {**serve_env(ctx, token), **self.extra_env()}
        proc = self.spawn(ManagedProcess(self.name, args, ctx.log_path(self.name), env=env))
        url = f"http://127.0.0.1:{inference}"
        await wait_healthy(f"{url}/health", what="corral /health 200", proc=proc, within=90)
        backend = await self._instance_url(management, token, proc)
        return Endpoint(url=url, backend_url=backend, model=ctx.model_name)

    async def _instance_url(self, port: int, token: str, proc: ManagedProcess) -> str:
        """The URL of corral's llama-server, from the management API."""
        found: list[str] = []

        async def has_instance() -> bool:
            body = await http_json(
                f"http://127.0.0.1:{port}/api/v1/instances",
                headers={"Authorization": f"Bearer {token}"},
            )
            instances = body.get("instances") if isinstance(body, dict) else None
            urls = [i.get("url") for i in instances or () if isinstance(i, dict)]
            found[:] = [u for u in urls if isinstance(u, str)]
            return bool(found)

        await wait_until(has_instance, what="corral's instance list", within=30, proc=proc)
        if len(found) != 1:
            raise StartupError(f"expected one corral instance, got {found}")
        return found[0].rstrip("/")

    def root(self) -> Path:
        """The checkout whose corral this system runs."""
        return REPO_ROOT

    def version(self, ctx: BenchContext) -> str:
        text = run_text([*self.command(), "--version"]).removeprefix("corral ").strip()
        git = ["git", "-C", str(self.root())]
        commit = run_text([*git, "rev-parse", "--short", "HEAD"])
        dirty = run_text([*git, "status", "--porcelain", "--untracked-files=no", "--", "src"])
        where = f" (git {commit}{', src/ modified' if dirty else ''})" if commit else ""
        return f"{text or 'unknown'}{where}"

    def observations(self, ctx: BenchContext) -> list[str]:
        try:
            text = ctx.log_path(self.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        waits = [float(w) for w in ACCESS_WAIT.findall(text)]
        waited = sorted(w for w in waits if w > 0.0005)
        failures = UPSTREAM_FAILED.findall(text)
        out = []
        if waited:
            out.append(
                f"{_count(len(waited), 'request')} of {len(waits)} waited in corral's buffer "
                f"for a slot (median {percentile(waited, 50) * 1000:.1f} ms, longest "
                f"{waited[-1] * 1000:.0f} ms), although no more clients than slots "
                "(`--parallel 4`) were ever in flight."
            )
        if failures:
            kinds = ", ".join(f"{k} {n}" for k, n in collections.Counter(failures).most_common())
            out.append(
                f"{_count(len(failures), 'request')} failed upstream before the first byte "
                f"({kinds}) and had to be placed again; corral's circuit breaker counts each "
                "such failure against the instance."
            )
        return out

    def setup(self, ctx: BenchContext) -> str:
        return (
            f"`corral serve --model {ctx.model.name} --llama-server BIN "
            f"--inference-addr 127.0.0.1:P --management-addr 127.0.0.1:Q -- "
            f"{shlex.join(ctx.llama_args)}` (default policy and log level)"
        )


class CorralTraced(Corral):
    """``corral serve`` with traces on, exporting every request's spans over OTLP/HTTP
    to a local receiver (:mod:`bench.otlp_sink`): what traces cost beside plain corral."""

    name = "corral-traced"
    label = "corral serve, traces on"

    def __init__(self) -> None:
        super().__init__()
        self.sink_port = 0
        self.sink: ManagedProcess | None = None
        """Not among :attr:`procs`: those share the proxy's core, and a collector
        runs elsewhere."""
        self.exported = ""

    async def start(self, ctx: BenchContext) -> Endpoint:
        self.sink_port = free_port()
        args = [sys.executable, "-m", "bench.otlp_sink", str(self.sink_port)]
        self.sink = ManagedProcess("otlp-sink", args, ctx.log_path("otlp-sink"), cwd=REPO_ROOT)
        self.sink.start()
        await wait_until(self._sink_up, what="the OTLP receiver", within=20, proc=self.sink)
        return await super().start(ctx)

    async def _sink_up(self) -> bool:
        return isinstance(await http_json(self._count_url()), dict)

    def _count_url(self) -> str:
        return f"http://127.0.0.1:{self.sink_port}/count"

    def extra_env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{self.sink_port}/v1/traces"
        }

    def stop(self) -> None:
        super().stop()  # corral exports what is left as it stops
        if self.sink is not None:
            try:
                with urllib.request.urlopen(self._count_url(), timeout=5) as answer:
                    counts = json.loads(answer.read())
                self.exported = f"{counts['spans']} spans in {counts['batches']} batches"
            except (OSError, ValueError, KeyError):
                self.exported = ""
            self.sink.stop()
            self.sink = None

    def observations(self, ctx: BenchContext) -> list[str]:
        out = super().observations(ctx)
        if self.exported:
            out.append(f"The OTLP receiver got {self.exported}.")
        return out

    def setup(self, ctx: BenchContext) -> str:
        return (
            super().setup(ctx)
            + " with `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` at a local OTLP/HTTP receiver "
            "(bench/otlp_sink.py), SDK defaults otherwise"
        )


class CorralBaseline(Corral):
    """``corral serve`` from another checkout, to measure a change against the code
    before it in the same run: ``CORRAL_BENCH_BASELINE`` is that checkout's root (e.g.
    ``git worktree add /tmp/base COMMIT``); it runs with this interpreter and
    ``PYTHONPATH`` set to its ``src``, so only corral's own code differs."""

    name = "corral-base"
    label = "corral serve (baseline)"

    def root(self) -> Path:
        value = os.environ.get("CORRAL_BENCH_BASELINE")
        if not value or not (Path(value) / "src" / "corral").is_dir():
            raise StartupError(
                "corral-base needs CORRAL_BENCH_BASELINE: the root of a corral checkout "
                "(git worktree add /tmp/base COMMIT)"
            )
        return Path(value)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "corral.cli"]

    def extra_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root() / "src")}

    def version(self, ctx: BenchContext) -> str:
        text = (
            run_text([*self.command(), "--version"], env={**os.environ, **self.extra_env()})
            .removeprefix("corral ")
            .strip()
        )
        commit = run_text(["git", "-C", str(self.root()), "rev-parse", "--short", "HEAD"])
        return f"{text or 'unknown'} (git {commit}, baseline)"
