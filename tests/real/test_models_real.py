"""Many models under the real llama-server: two tiny GGUFs swap under concurrent load.

``corral serve`` runs as a process over a models folder with ``--max-instances 1``, so
every switch between the two models is a real swap: drain one llama-server, stop it,
start the other. Alternating concurrent requests must all succeed.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from openai import OpenAI

from corral.catalog.tiny import make_tiny_model
from tests.support.net import free_port
from tests.support.serve_process import READY_TIMEOUT_S
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

TOKEN = "real-models-token"


def _models(management: str) -> dict[str, dict[str, object]]:
    request = urllib.request.Request(
        management + "/api/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return {m["id"]: m for m in json.loads(response.read())["models"]}


@pytest.fixture(scope="module")
def swapping(
    llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, Path]]:
    tmp = tmp_path_factory.mktemp("models-real")
    folder = tmp / "models"
    make_tiny_model(folder / "alpha.gguf", seed=1, name="alpha")
    make_tiny_model(folder / "beta.gguf", seed=2, name="beta")
    config = tmp / "corral.yaml"
    config.write_text('llama_args: ["--parallel", "4", "--ctx-size", "2048"]\n')
    inference, management = free_port(), free_port()
    log_path = tmp / "corral.log"
    env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": TOKEN, "CORRAL_STATE_DIR": str(tmp)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "corral.cli", "serve", "--config", str(config),
                "--models-dir", str(folder), "--max-instances", "1",
                "--llama-server", str(llama_server_bin),
                "--inference-addr", f"127.0.0.1:{inference}",
                "--management-addr", f"127.0.0.1:{management}",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_until(
            lambda: b"corral serve:" in log_path.read_bytes(),
            "corral serve to start",
            READY_TIMEOUT_S,
            watch=[(process, log_path)],
        )
        yield f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{management}", log_path
    finally:
        process.terminate()
        process.wait(30)


def test_models_are_listed_unloaded_until_asked_for(swapping: tuple[str, str, Path]) -> None:
    base, management, _ = swapping
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    listed = sorted(m.id for m in client.models.list())
    assert listed == ["alpha", "beta"]
    assert {m["state"] for m in _models(management).values()} <= {"unloaded", "loaded"}


def test_two_models_swap_under_concurrent_load_with_no_failed_request(
    swapping: tuple[str, str, Path],
) -> None:
    base, management, log_path = swapping

    async def run() -> list[tuple[str, int, str]]:
        limit = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as http:

            async def one(index: int) -> tuple[str, int, str]:
                model = ("alpha", "beta")[index % 2]
                body = {
                    "model": model,
                    "max_tokens": 8,
                    "stream": index % 4 < 2,
                    "messages": [{"role": "user", "content": f"request {index}"}],
                }
                async with limit, http.post(base + "/v1/chat/completions", json=body) as r:
                    return model, r.status, await r.text()

            return await asyncio.gather(*(one(i) for i in range(48)))

    results = asyncio.run(run())
    failed = [(m, s, t[:200]) for m, s, t in results if s != 200 or '"error"' in t]
    assert failed == [], failed
    loads = log_path.read_text().count("loaded model=")
    assert loads >= 2, "both models were served, so at least one swap happened"
    assert loads < 48 // 2, f"{loads} loads for 48 requests: swaps are not batched"
    deadline = time.monotonic() + 10
    while True:  # a load queued by the last requests is dropped once nobody waits
        states = sorted(row["state"] for row in _models(management).values())
        if states == ["loaded", "unloaded"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert states == ["loaded", "unloaded"]  # max_instances 1


def test_a_swap_under_the_real_llama_server_streams_loading_notices_then_tokens(
    swapping: tuple[str, str, Path],
) -> None:
    base, management, _ = swapping
    states = {model: row["state"] for model, row in _models(management).items()}
    loaded = next((m for m, s in states.items() if s == "loaded"), None)
    if loaded is None:  # nothing up yet: load one, so that asking for the other swaps
        OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        loaded = "alpha"
    other = "beta" if loaded == "alpha" else "alpha"
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=other,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        stream=True,
        extra_headers={"X-Corral-Loading-Notices": "1"},
    )
    reasoning, content = "", ""
    for part in stream:
        if not part.choices:
            continue
        extra = part.choices[0].delta.model_extra or {}
        if extra.get("reasoning_content"):
            assert not content, "a notice came after the model's first token"
            reasoning += extra["reasoning_content"]
        content += part.choices[0].delta.content or ""
    assert reasoning.startswith(f"corral: loading model {other}…\n"), reasoning
    assert f"corral: unloading {loaded} to make room for {other}…\n" in reasoning
    assert f"corral: {other} ready after " in reasoning
    assert content, "the real model's tokens followed the notices"


def _chat_with_flags(base: str, model: str, flags: str) -> tuple[int, dict[str, object]]:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Corral-Flags": flags},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_flags_the_real_llama_server_cannot_start_with_are_a_400_then_refused_at_once(
    swapping: tuple[str, str, Path],
) -> None:
    """Out-of-range values never reach llama-server; allowed values it still cannot
    start with (a quantized V cache without flash attention) fail once, quickly, with
    a short reason, and are refused at once afterwards; the model serves plainly."""
    base, _, log_path = swapping
    status, body = _chat_with_flags(base, "alpha", "-np 512")
    assert status == 400, body
    assert "flag -np" in str(body) and "1 to 256" in str(body)
    status, body = _chat_with_flags(base, "alpha", "-ctv q4_0 -fa off")
    assert status == 400, body
    message = str(body["error"]["message"])  # type: ignore[index]
    assert "failed to start" in message and "exited with code 1" in message
    assert "last log lines:" not in message  # llama-server's lines stay in the log
    assert "failed to create" in log_path.read_text(errors="replace")
    status, body = _chat_with_flags(base, "alpha", "--cache-type-v q4_0 --flash-attn off")
    assert status == 400, body
    assert "failed within the last" in str(body)
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message is not None


def test_a_gzip_body_reaches_the_real_llama_server_decoded(
    swapping: tuple[str, str, Path],
) -> None:
    """llama-server answers 415 to any Content-Encoding; corral decodes and forwards."""
    base, _, _ = swapping
    body = json.dumps(
        {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=gzip.compress(body),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert json.loads(response.read())["choices"]
