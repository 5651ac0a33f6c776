"""A fleet of real llama-servers on loopback and the corral front door put before it.

Shared by the workloads that place requests over several llama-servers (``multiturn``,
``hetero``): start the servers (each with its own ``--parallel``), read their counters,
and start ``corral balancer`` with one ``corral agent`` per server under a given policy.
The other front doors have their own starters beside their systems
(:func:`bench.systems.litellm.start_proxy`, :func:`bench.systems.nginx.start_proxy`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import pinning
from bench.context import BenchContext, wait_healthy, wait_until
from bench.procs import ManagedProcess, free_port
from bench.systems.corral import corral_command

COUNTER = re.compile(r"^llamacpp:(\w+_total)\s+([0-9.e+]+)", re.M)


def tiny_model(ctx: BenchContext, name: str, *, seed: int, **shape: Any) -> Path:
    """The bench's tiny llama in another shape (``n_embd``, ``n_layer``, ...: see
    :func:`corral.catalog.tiny.make_tiny_model`), written once a run under the run's
    ``models/`` as ``{name}.gguf`` (its alias is ``name``)."""
    from corral.catalog.tiny import make_tiny_model

    path = ctx.run_dir / "models" / f"{name}.gguf"
    if not path.is_file():
        make_tiny_model(path, name=name, seed=seed, **shape)
    return path


def model_words(model: Path) -> list[str]:
    """Whole words of the tiny model's vocabulary (prompts made of them tokenize
    predictably, about two tokens a word)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)
    field_ = reader.fields["tokenizer.ggml.tokens"]
    words = []
    for index in field_.data:
        token = bytes(field_.parts[index]).decode("utf-8", errors="replace")
        word = token.lstrip("\u2581 ").strip()
        if word.isalpha() and len(word) > 2:
            words.append(word)
    return sorted(set(words)) or ["hello", "world"]


class Processes:
    """The processes one measurement started, stopped together, last started first."""

    def __init__(self) -> None:
        self.procs: list[ManagedProcess] = []

    def spawn(self, proc: ManagedProcess) -> ManagedProcess:
        self.procs.append(proc.start())
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def llama_server_args(
    ctx: BenchContext,
    model: Path,
    alias: str,
    port: int,
    *,
    parallel: int,
    context: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """One llama-server on loopback: one thread for generation and for prompts (the
    machine has two cores and a fleet shares them), ``/metrics`` on, then ``extra``."""
    return [
        str(ctx.llama_server),
        "--model",
        str(model),
        "--alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(parallel),
        "--ctx-size",
        str(context),
        "--threads",
        "1",
        "--threads-batch",
        "1",
        "--metrics",
        *extra,
    ]


async def start_llama_servers(
    ctx: BenchContext,
    processes: Processes,
    model: Path,
    alias: str,
    name: str,
    parallels: Sequence[int],
    context: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """Start one llama-server per entry of ``parallels`` (its ``--parallel``), all at
    once, each with ``extra`` arguments; return their base URLs once every one answers
    ``/health``. Logs are ``{name}-llama{i}``."""
    backends, started = [], []
    for index, parallel in enumerate(parallels):
        port = free_port()
        proc_name = f"{name}-llama{index}"
        args = llama_server_args(
            ctx, model, alias, port, parallel=parallel, context=context, extra=extra
        )
        started.append(processes.spawn(ManagedProcess(proc_name, args, ctx.log_path(proc_name))))
        backends.append(f"http://127.0.0.1:{port}")
    for backend, proc in zip(backends, started, strict=True):
        await wait_healthy(f"{backend}/health", what=f"{proc.name} /health", proc=proc)
    return backends


async def server_counters(url: str) -> dict[str, float]:
    """llama-server's ``llamacpp:*_total`` counters (``prompt_tokens_total``,
    ``tokens_predicted_total``, ...) from its ``/metrics``, without the prefix."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "/metrics") as response,
    ):
        text = await response.text()
    return {name: float(value) for name, value in COUNTER.findall(text)}


async def start_corral(
    ctx: BenchContext,
    processes: Processes,
    name: str,
    policy: str,
    backends: Sequence[str],
    *,
    balancer_args: Sequence[str] = (),
    pinned: bool = False,
    command: Sequence[str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, str]]:
    """``corral balancer --policy POLICY [BALANCER_ARGS]`` with one ``corral agent
    --local-llama-server`` per backend; return the inference URL and the headers a
    client sends, once the balancer counts every backend as a usable instance. The
    balancer is the first process this spawns. ``pinned``: the balancer on
    :data:`pinning.PROXY_CORE`, the agents on :data:`pinning.OTHER_CORE`. ``command``
    and ``extra_env``: how to run another checkout's corral (the baseline system)."""
    cli = list(command) if command is not None else corral_command()

    def on(core: int, args: list[str]) -> list[str]:
        return pinning.taskset(core, args) if pinned else args

    inference, management = free_port(), free_port()
    state = ctx.run_dir / f"{name}-state"
    state.mkdir(parents=True, exist_ok=True)
    env = {
        "CORRAL_MANAGEMENT_TOKEN": secrets.token_urlsafe(24),
        "CORRAL_CLUSTER_TOKEN": secrets.token_urlsafe(24),
        "CORRAL_STATE_DIR": str(state),
        **(extra_env or {}),
    }
    balancer = processes.spawn(
        ManagedProcess(
            name,
            on(
                pinning.PROXY_CORE,
                [
                    *cli,
                    "balancer",
                    "--policy",
                    policy,
                    "--inference-addr",
                    f"127.0.0.1:{inference}",
                    "--management-addr",
                    f"127.0.0.1:{management}",
                    *balancer_args,
                ],
            ),
            ctx.log_path(name),
            env=env,
        )
    )
    for index, backend in enumerate(backends):
        agent = f"{name}-agent{index}"
        processes.spawn(
            ManagedProcess(
                agent,
                on(
                    pinning.OTHER_CORE,
                    [
                        *cli,
                        "agent",
                        "--local-llama-server",
                        backend,
                        "--balancer",
                        f"127.0.0.1:{management}",
                        "--name",
                        f"server{index}",
                    ],
                ),
                ctx.log_path(agent),
                env=env,
            )
        )
    headers = {"Authorization": f"Bearer {env['CORRAL_MANAGEMENT_TOKEN']}"}

    async def all_usable() -> bool:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(
                f"http://127.0.0.1:{management}/api/v1/instances", headers=headers
            ) as response,
        ):
            body = await response.json()
        usable = sum(1 for i in body.get("instances", []) if i.get("usable"))
        return usable == len(backends)

    await wait_until(all_usable, what=f"{len(backends)} usable instances", within=60, proc=balancer)
    return f"http://127.0.0.1:{inference}", {}
