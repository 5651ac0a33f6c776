"""A :class:`~corral.serve.LocalServe` in the test's process over fake llama-servers
(real processes), with a ``models`` table: the helpers of the many-models tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from corral.config import load_settings
from corral.serve import LocalServe, ServeOptions
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for

TOKEN = "models-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": f"hello {model}"}],
    }


@asynccontextmanager
async def serving_table(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    table: dict[str, dict[str, Any]],
    binary: Path | None,
    **settings: Any,
) -> AsyncIterator[tuple[LocalServe, str, aiohttp.ClientSession]]:
    """A LocalServe whose config's ``models`` table is exactly ``table`` and whose
    llama-server is ``binary`` (None: none found)."""
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path))
    config = tmp_path / "corral.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inference_addr": "127.0.0.1:0",
                "management_addr": "127.0.0.1:0",
                "models": table,
                "restart_backoff_initial": 0.1,
                **settings,
            }
        )
    )
    local = LocalServe(
        load_settings(config, environ={}),
        ServeOptions(binary=binary, management_token=TOKEN, cluster_token="cluster"),
    )
    local.config_file = config
    addresses = await local.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield local, f"http://{addresses.inference}", http
    finally:
        await local.stop()


@asynccontextmanager
async def serving(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: dict[str, dict[str, Any]],
    **settings: Any,
) -> AsyncIterator[tuple[LocalServe, str, aiohttp.ClientSession]]:
    """A LocalServe over fake llama-servers, one ``models`` entry each."""
    table = {}
    for model_id, entry in models.items():
        path = tmp_path / f"{model_id}.gguf"
        path.write_bytes(b"GGUF")  # the fake never reads it
        table[model_id] = {"path": str(path), **entry}
    async with serving_table(
        tmp_path, monkeypatch, table, fake_binary(tmp_path), **settings
    ) as served:
        yield served


def running(local: LocalServe) -> dict[str, str]:
    assert local.host is not None
    return {key: hosted.state for key, hosted in local.host.running.items()}


async def settled(local: LocalServe) -> dict[str, str]:
    """What runs once no load or unload is under way (a request may be answered a
    moment before the host notes its instance loaded)."""
    await wait_for(
        lambda: not {"loading", "unloading"} & set(running(local).values()), "loads to settle"
    )
    return running(local)


def pid_of(local: LocalServe, key: str) -> int | None:
    assert local.host is not None
    child = local.host.running[key].managed.supervisor.child
    return child.pid if child else None


async def complete(
    http: aiohttp.ClientSession, base: str, model: str, **extra: Any
) -> tuple[int, Any]:
    async with http.post(base + "/v1/chat/completions", json={**chat(model), **extra}) as response:
        return response.status, await response.json()


async def stream_through(
    http: aiohttp.ClientSession, base: str, model: str, on_first: Callable[[], None] | None = None
) -> tuple[int, str]:
    """Stream a chat completion to its end; the status and every byte received."""
    async with http.post(base + "/v1/chat/completions", json=chat(model, True)) as response:
        body = b""
        async for chunk in response.content.iter_any():
            if not body and on_first is not None:
                on_first()
            body += chunk
        return response.status, body.decode()
