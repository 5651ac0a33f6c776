"""The real llama-server loads the generated tiny model and serves what corral relies on.

A fake llama-server can only claim these: readiness through ``/health``, slots,
OpenAI-shaped chat completions (plain and streamed, checked with the official
``openai`` client) and cached prompt tokens on a repeated prompt. One server is started
per module, on a free port with an argument list (no shell), and killed in a finalizer.

Fixtures ``llama_server_bin`` (Path to the binary) and ``tiny_model`` (Path to a model
from ``corral.catalog.tiny.make_tiny_model``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.net import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

N_SLOTS = 2
CTX_SIZE = 2048
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
START_ATTEMPTS = 3  # another process may grab the free port before llama-server binds it

LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog near the river"] * 8)


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _get(url: str) -> tuple[int, Any]:
    """GET returning (status, decoded JSON or None); HTTP errors are statuses, not raises."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def _is_healthy(base_url: str) -> bool:
    try:
        status, _ = _get(f"{base_url}/health")
    except OSError:  # not listening yet
        return False
    return status == 200


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start(binary: Path, model: Path, log_path: Path) -> RunningServer:
    port = free_port()
    args = [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(N_SLOTS),
        "--ctx-size",
        str(CTX_SIZE),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    return RunningServer(f"http://127.0.0.1:{port}", process, log_path)


@pytest.fixture(scope="module")
def tiny_server(
    request: pytest.FixtureRequest,
    llama_server_bin: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    log_dir = tmp_path_factory.mktemp("llama-server")
    for attempt in range(START_ATTEMPTS):
        server = _start(llama_server_bin, tiny_model, log_dir / f"attempt-{attempt}.log")
        request.addfinalizer(functools.partial(_stop, server.process))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while server.process.poll() is None and not _is_healthy(server.base_url):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"llama-server not healthy after {READY_TIMEOUT_S}s:\n{server.log_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)
        if server.process.poll() is None:
            return server
        if "couldn't bind" not in server.log_tail():
            break
    pytest.fail(f"llama-server exited with {server.process.returncode}:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def client(tiny_server: RunningServer) -> OpenAI:
    return OpenAI(
        base_url=f"{tiny_server.base_url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
    )


def test_health_reports_ok_once_tiny_model_is_loaded(tiny_server: RunningServer) -> None:
    status, body = _get(f"{tiny_server.base_url}/health")
    assert status == 200
    assert body == {"status": "ok"}


def test_slots_lists_requested_parallel_slots_idle(tiny_server: RunningServer) -> None:
    wait_until(
        lambda: all(not s["is_processing"] for s in _get(f"{tiny_server.base_url}/slots")[1]),
        "all slots idle",
        REQUEST_TIMEOUT_S,
        watch=[(tiny_server.process, tiny_server.log_path)],
    )
    status, slots = _get(f"{tiny_server.base_url}/slots")
    assert status == 200
    assert [slot["id"] for slot in slots] == list(range(N_SLOTS))
    assert all(slot["n_ctx"] == CTX_SIZE // N_SLOTS for slot in slots)


def test_props_reports_slot_count_and_chatml_template(tiny_server: RunningServer) -> None:
    status, props = _get(f"{tiny_server.base_url}/props")
    assert status == 200
    assert props["total_slots"] == N_SLOTS
    assert "<|im_start|>" in props["chat_template"]
    assert props["default_generation_settings"]["n_ctx"] == CTX_SIZE // N_SLOTS


def test_chat_completion_runs_to_max_tokens(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0


def test_streamed_chat_completion_yields_content_deltas_then_length_finish(
    client: OpenAI,
) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Stream something."}],
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    assert chunks
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert 1 <= len(deltas) <= 8
    assert "".join(deltas).strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert all(reason is None for reason in finishes[:-1])


def test_repeated_long_prompt_reports_cached_prompt_tokens(client: OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": LONG_PROMPT}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)

    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 100
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens > first.usage.prompt_tokens // 2
    timings = (second.model_extra or {}).get("timings", {})
    assert timings.get("cache_n", 0) > 0
