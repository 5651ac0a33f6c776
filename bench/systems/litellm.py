"""The LiteLLM proxy in front of a plain llama-server, from its own virtualenv.

LiteLLM lives in ``bench/.venvs/litellm`` (git-ignored), never in corral's
environment, pinned to :data:`LITELLM_VERSION`. LiteLLM 1.82.7 and 1.82.8 (March 2026)
were compromised releases carrying a credential stealer, and a scanner on PyPI names
1.107.0 as compromised too; the pin is none of these. It is the newest release whose
dependencies install from the package index this project uses: every later release
(1.106.3 and up, 1.108.x, 1.109.x) requires ``certifi>=2026.10.19``, which the index
does not have.

Configuration: one model, the ``openai/`` provider with ``api_base`` at the
llama-server, ``routing_strategy: simple-shuffle``, a master key (LiteLLM refuses to
run without one), one uvicorn worker, no database, and the bundled model cost map
(``LITELLM_LOCAL_MODEL_COST_MAP``) so start-up does not try the network.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from bench.context import BENCH_DIR, BenchContext, StartupError, http_status, wait_until
from bench.procs import ManagedProcess, free_port, run_text
from bench.systems.base import Endpoint, System, start_llama_server

LITELLM_VERSION = "1.106.2"
LITELLM_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
COMPROMISED = frozenset({"1.82.7", "1.82.8", "1.107.0"})
PIN_REASON = (
    "not 1.82.7, 1.82.8 or 1.107.0 (compromised releases); the newest release whose "
    "dependencies install from this project's package index (1.106.3 and later require "
    "certifi>=2026.10.19, which the index lacks)"
)
VENV = BENCH_DIR / ".venvs" / "litellm"
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "WARNING",
}

assert LITELLM_VERSION not in COMPROMISED


def _venv_bin(name: str) -> Path:
    return VENV / "bin" / name


def installed_version() -> str | None:
    python = _venv_bin("python")
    if not python.is_file():
        return None
    text = run_text([python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
    return text.strip().splitlines()[-1] if text else None


def ensure_installed() -> None:
    """Create the venv and install the pinned LiteLLM if it isn't there yet."""
    if installed_version() == LITELLM_VERSION:
        return
    if not _venv_bin("python").is_file():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(VENV)], capture_output=True, check=False
        )
        if made.returncode != 0:
            raise StartupError(f"cannot create {VENV}: {made.stderr.decode(errors='replace')}")
    done = subprocess.run(
        [str(_venv_bin("pip")), "install", "--quiet", LITELLM_REQUIREMENT],
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise StartupError(f"pip install {LITELLM_REQUIREMENT} failed: " + " / ".join(err))


async def start_proxy(
    ctx: BenchContext,
    name: str,
    model_name: str | Sequence[str],
    backends: list[str],
    spawn: Callable[[ManagedProcess], ManagedProcess],
    routing_strategy: str = "simple-shuffle",
) -> tuple[str, dict[str, str]]:
    """Start the pinned LiteLLM proxy serving ``model_name`` (or each of several names)
    from ``backends`` (llama-server base URLs, one model group per name routed by
    ``routing_strategy``) through ``spawn``; return its URL and the headers a client
    sends, once it answers its liveness check."""
    master_key = "sk-bench-" + secrets.token_hex(12)
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": f"{backend}/v1",
                    "api_key": "none",
                },
            }
            for name in names
            for backend in backends
        ],
        "router_settings": {"routing_strategy": routing_strategy},
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"set_verbose": False},
    }
    config_path = ctx.run_dir / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    port = free_port()
    args = [
        str(_venv_bin("litellm")),
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {**ENV, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = spawn(ManagedProcess(name, args, ctx.log_path(name), env=env))
    url = f"http://127.0.0.1:{port}"

    async def alive() -> bool:
        return await http_status(f"{url}/health/liveliness") == 200

    await wait_until(alive, what="LiteLLM /health/liveliness", within=180, proc=proc)
    return url, {"Authorization": f"Bearer {master_key}"}


class LiteLLM(System):
    name = "litellm"
    label = "LiteLLM proxy"

    def unavailable(self, ctx: BenchContext) -> str | None:
        if installed_version() == LITELLM_VERSION or ctx.install_missing:
            return None
        return f"{LITELLM_REQUIREMENT} is not installed in {VENV} (--no-install)"

    async def start(self, ctx: BenchContext) -> Endpoint:
        ensure_installed()
        backend = await start_llama_server(self, ctx, "litellm-llama-server")
        url, headers = await start_proxy(ctx, "litellm", ctx.model_name, [backend], self.spawn)
        return Endpoint(url=url, backend_url=backend, model=ctx.model_name, headers=headers)

    def observations(self, ctx: BenchContext) -> list[str]:
        try:
            text = ctx.log_path("litellm").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        errors = [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]
        if not errors:
            return []
        return [f"LiteLLM logged {len(errors)} error lines; first: `{errors[0][:160]}`"]

    def version(self, ctx: BenchContext) -> str:
        found = installed_version()
        return f"{found or 'not installed'} (pinned)"

    def note(self, ctx: BenchContext) -> str | None:
        return f"LiteLLM is pinned to {LITELLM_VERSION}: {PIN_REASON}."

    def setup(self, ctx: BenchContext) -> str:
        return (
            f"`litellm --config CFG --num_workers 1` ({LITELLM_REQUIREMENT}, own venv): "
            f"one model `openai/{ctx.model_name}` with `api_base` at its own llama-server, "
            "`routing_strategy: simple-shuffle`, a master key, no database"
        )
