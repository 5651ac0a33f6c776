"""llama-server's own router mode: one process spawning a child per model.

Started with no model and ``--models-dir DIR --models-max 1``; the tiny model is the
only file in DIR, so its id is the file stem. The child inherits the router's other
arguments (``--parallel``, ``--ctx-size``), which makes it the same llama-server every
other system runs. The first request loads it; we send one as a warm-up and read the
child's port from ``GET /models`` (``status.args``) for the paired baseline.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from bench.context import BenchContext, StartupError, http_json, wait_healthy, wait_until
from bench.loadgen import LoadGenerator, chat_request
from bench.procs import ManagedProcess, free_port
from bench.systems.base import Endpoint, System
from bench.systems.direct import llama_server_version


def _model_entry(body: object, model: str) -> dict[str, Any] | None:
    data = body.get("data") if isinstance(body, dict) else None
    for entry in data or ():
        if isinstance(entry, dict) and entry.get("id") == model:
            return entry
    return None


def models_dir(ctx: BenchContext) -> Path:
    """A folder holding only the bench's model (hard link, else a copy)."""
    folder = ctx.run_dir / "router-models"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ctx.model.name
    if not target.exists():
        try:
            target.hardlink_to(ctx.model)
        except OSError:
            shutil.copy2(ctx.model, target)
    return folder


def router_args(ctx: BenchContext, port: int, folder: Path | None = None) -> list[str]:
    """llama-server in router mode on ``port``: no model, ``--models-dir`` (``folder``,
    else one holding only the bench's model), one loaded at a time."""
    return [
        str(ctx.llama_server),
        "--models-dir",
        str(folder or models_dir(ctx)),
        "--models-max",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *ctx.llama_args,
    ]


class Router(System):
    name = "router"
    label = "llama-server router mode"

    async def start(self, ctx: BenchContext) -> Endpoint:
        port = free_port()
        proc = self.spawn(ManagedProcess("router", router_args(ctx, port), ctx.log_path("router")))
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(f"{url}/health", what="router /health", proc=proc)
        entry = _model_entry(await http_json(f"{url}/models"), ctx.model_name)
        if entry is None:
            raise StartupError(f"router's GET /models does not list {ctx.model_name!r}")
        async with LoadGenerator(url) as gen:
            warm = await gen.send(chat_request(ctx.model_name, stream=False))
        if not warm.ok:
            raise StartupError(f"router warm-up request failed: {warm.error}")
        child_port: list[str] = []

        async def loaded() -> bool:
            found = _model_entry(await http_json(f"{url}/models"), ctx.model_name) or {}
            status = found.get("status") or {}
            args = list(status.get("args") or ())
            if status.get("value") == "loaded" and "--port" in args:
                child_port[:] = [args[args.index("--port") + 1]]
                return True
            return False

        await wait_until(loaded, what="router model loaded", within=60, proc=proc)
        backend = f"http://127.0.0.1:{child_port[0]}"
        try:
            await wait_healthy(f"{backend}/health", what="router child /health", proc=proc)
        except aiohttp.ClientError as exc:  # pragma: no cover - wait_healthy retries these
            raise StartupError(str(exc)) from exc
        return Endpoint(url=url, backend_url=backend, model=ctx.model_name)

    def version(self, ctx: BenchContext) -> str:
        return f"{llama_server_version(ctx)} (the same binary)"

    def setup(self, ctx: BenchContext) -> str:
        return (
            f"`llama-server --models-dir DIR --models-max 1 {shlex.join(ctx.llama_args)}`, "
            f"DIR holding only {ctx.model.name}; requests name `{ctx.model_name}`; "
            "preloaded by one warm-up request"
        )
