"""The fake llama-server's answers have the real llama-server's shapes.

Integration tests trust the fake (``corral.testing.fake_llama_server``) to answer like
llama-server. This module keeps it honest: it starts the real ``llama-server`` with the
tiny generated model and the fake side by side, sends both the same requests on every
endpoint the fake fakes, and asserts that the fake's JSON has the same keys, recursively,
with the same JSON types (null, bool, int, float, string, array, object). Values are not
compared: the fake's text is not the model's text. Streams are compared chunk by chunk,
so they must also have the same number of chunks and the same end marker.

The fake may leave out the keys in :data:`OMITTED`, each with its reason; any other
missing key, and any key the fake adds that the real server lacks, fails the test.

Fixtures ``llama_server_bin`` (Path to the binary) and ``tiny_model`` (Path to a model
from ``corral.catalog.tiny.make_tiny_model``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import functools
import json
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port

pytestmark = pytest.mark.real

N_SLOTS = 2
CTX_SIZE = 2048
MAX_TOKENS = 4
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05
START_ATTEMPTS = 3  # another process may take the free port before llama-server binds it

OMITTED: dict[str, str] = {
    # paths are dotted, with [] for "any element of this array"
}
"""Keys the real server sends and the fake leaves out, each with why. Keep it short."""

CHAT = {
    "messages": [{"role": "user", "content": "hello there my friend"}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
}
PROMPT = {"prompt": "hello there my friend", "n_predict": MAX_TOKENS, "temperature": 0}


# ------------------------------------------------------------------ servers
@dataclass(frozen=True)
class Server:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def _healthy(base_url: str) -> bool:
    try:
        status, _ = call("GET", f"{base_url}/health")
    except OSError:  # not listening yet
        return False
    return status == 200


def _wait_healthy(server: Server) -> bool:
    """True once healthy; False if the process died (e.g. lost the port race)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while server.process.poll() is None:
        if _healthy(server.base_url):
            return True
        if time.monotonic() > deadline:
            pytest.fail(f"{server.name} not healthy after {READY_TIMEOUT_S}s:\n{server.log_tail()}")
        time.sleep(POLL_INTERVAL_S)
    return False


def _start_real(
    request: pytest.FixtureRequest, binary: Path, model: Path, log_dir: Path, *extra: str
) -> Server:
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        args = [
            str(binary),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ]
        log_path = log_dir / f"real-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        request.addfinalizer(functools.partial(_stop, process))
        server = Server("llama-server", f"http://127.0.0.1:{port}", process, log_path)
        if _wait_healthy(server):
            return server
    pytest.fail(f"llama-server did not start in {START_ATTEMPTS} attempts:\n{server.log_tail()}")


def _start_fake(request: pytest.FixtureRequest, log_dir: Path, *extra: str) -> Server:
    log_path = log_dir / "fake.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "corral.testing.fake_llama_server", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    request.addfinalizer(functools.partial(_stop, process))
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
    line = process.stdout.readline().decode() if ready else ""
    match = re.fullmatch(r"listening on (http://\S+)\n", line)
    assert match, f"fake printed {line!r}; log:\n{log_path.read_text(errors='replace')}"
    server = Server("fake", match[1], process, log_path)
    assert _wait_healthy(server), f"fake died:\n{server.log_tail()}"
    return server


@dataclass(frozen=True)
class Pair:
    real: Server
    fake: Server


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest,
    llama_server_bin: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Pair:
    """A real llama-server and a fake, both with the same slots and context."""
    log_dir = tmp_path_factory.mktemp("shapes")
    common = ["--parallel", str(N_SLOTS), "--ctx-size", str(CTX_SIZE)]
    real = _start_real(request, llama_server_bin, tiny_model, log_dir, *common, "--metrics")
    fake = _start_fake(request, log_dir, *common, "--tokens", str(MAX_TOKENS * 2))
    return Pair(real, fake)


@pytest.fixture(scope="module")
def embedding_servers(
    request: pytest.FixtureRequest,
    llama_server_bin: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Pair:
    """A real llama-server started for embeddings (mean pooling: the tiny model has none)."""
    log_dir = tmp_path_factory.mktemp("shapes-embd")
    real = _start_real(
        request, llama_server_bin, tiny_model, log_dir, "--embeddings", "--pooling", "mean"
    )
    fake = _start_fake(request, log_dir)
    return Pair(real, fake)


# ------------------------------------------------------------------- requests
def call(method: str, url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, bytes]:
    """One HTTP request on a fresh connection; HTTP errors are statuses, not raises."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def both(
    pair: Pair, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> Iterator[tuple[int, bytes]]:
    for server in (pair.real, pair.fake):
        yield call(method, server.base_url + path, body, raw)


def sse(raw: bytes) -> list[Any]:
    """A stream's ``data:`` events, JSON-decoded except the ``[DONE]`` marker."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------- comparison
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def shape_differences(real: Any, fake: Any, path: str = "$") -> list[str]:
    """Where ``fake`` differs from ``real`` in keys or JSON types, as readable lines."""
    if _kind(real) != _kind(fake):
        return [f"{path}: real is {_kind(real)}, fake is {_kind(fake)}"]
    diffs: list[str] = []
    if isinstance(real, dict):
        for key in real.keys() - fake.keys():
            if f"{path}.{key}" not in OMITTED:
                diffs.append(f"{path}.{key}: missing from the fake")
        for key in fake.keys() - real.keys():
            diffs.append(f"{path}.{key}: only in the fake")
        for key in real.keys() & fake.keys():
            diffs += shape_differences(real[key], fake[key], f"{path}.{key}")
    elif isinstance(real, list):
        if bool(real) != bool(fake):
            diffs.append(f"{path}: real has {len(real)} elements, fake {len(fake)}")
        elif real:
            # arrays hold one kind of element here: each fake element against the first
            for element in fake:
                diffs += shape_differences(real[0], element, f"{path}[]")
    return sorted(set(diffs))


def assert_same_shape(real: Any, fake: Any, what: str) -> None:
    diffs = shape_differences(real, fake)
    assert not diffs, f"{what}: the fake's shape differs from llama-server's:\n" + "\n".join(diffs)


def assert_same_answers(pair: Pair, method: str, path: str, body: Any = None) -> None:
    (real_status, real_raw), (fake_status, fake_raw) = both(pair, method, path, body)
    assert fake_status == real_status, (path, real_raw[:500], fake_raw[:500])
    assert_same_shape(json.loads(real_raw), json.loads(fake_raw), f"{method} {path}")


def assert_same_streams(pair: Pair, path: str, body: Any) -> None:
    (real_status, real_raw), (fake_status, fake_raw) = both(pair, "POST", path, body)
    assert real_status == fake_status == 200, (real_raw[:500], fake_raw[:500])
    real, fake = sse(real_raw), sse(fake_raw)
    assert len(real) == len(fake), (
        f"{path}: {len(real)} events from llama-server, {len(fake)} from the fake\n"
        f"real: {real}\nfake: {fake}"
    )
    for i, (r, f) in enumerate(zip(real, fake, strict=True)):
        if r == "[DONE]" or f == "[DONE]":
            assert r == f, f"{path} event {i}: {r!r} vs {f!r}"
        else:
            assert_same_shape(r, f, f"{path} event {i}")


# ---------------------------------------------------------------------- tests
def test_health_has_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "GET", "/health")


def test_props_have_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "GET", "/props")


def test_models_have_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "GET", "/v1/models")
    assert_same_answers(servers, "GET", "/models")


def test_slots_have_the_real_shape_before_and_after_a_task(servers: Pair) -> None:
    for server in (servers.real, servers.fake):
        status, raw = call("GET", server.base_url + "/slots")
        assert status == 200
        for slot in json.loads(raw):
            assert {"id", "n_ctx", "speculative", "is_processing"} <= slot.keys()
    for _ in both(servers, "POST", "/completion", {**PROMPT, "id_slot": 0}):
        pass
    (_, real_raw), (_, fake_raw) = both(servers, "GET", "/slots")
    real_slots, fake_slots = json.loads(real_raw), json.loads(fake_raw)
    assert len(real_slots) == len(fake_slots) == N_SLOTS
    assert_same_shape(real_slots[0], fake_slots[0], "GET /slots, a used slot")


def test_chat_completion_has_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "POST", "/v1/chat/completions", CHAT)


def test_streamed_chat_completion_has_the_real_shape(servers: Pair) -> None:
    assert_same_streams(servers, "/v1/chat/completions", {**CHAT, "stream": True})
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    assert_same_streams(servers, "/v1/chat/completions", {**CHAT, **usage})


def test_native_completion_has_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "POST", "/completion", PROMPT)


def test_streamed_native_completion_has_the_real_shape(servers: Pair) -> None:
    assert_same_streams(servers, "/completion", {**PROMPT, "stream": True})


def test_oai_completion_has_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "POST", "/v1/completions", PROMPT)
    assert_same_streams(servers, "/v1/completions", {**PROMPT, "stream": True})


def test_cached_tokens_are_reported_alike(servers: Pair) -> None:
    """Both report no cache on a slot's first prompt and n_prompt - 1 on a repeat."""
    request = {**PROMPT, "id_slot": 1, "prompt": "a fresh prompt for slot one only"}
    for server in (servers.real, servers.fake):
        status, raw = call("POST", server.base_url + "/completion", request)
        assert status == 200
        first = json.loads(raw)
        status, raw = call("POST", server.base_url + "/completion", request)
        second = json.loads(raw)
        assert second["timings"]["cache_n"] == second["tokens_evaluated"] - 1, server.name
        assert second["timings"]["prompt_n"] == 1, server.name
        assert first["timings"]["cache_n"] < second["timings"]["cache_n"], server.name


def test_tokenize_and_detokenize_have_the_real_shape(servers: Pair) -> None:
    assert_same_answers(servers, "POST", "/tokenize", {"content": "hello there"})
    assert_same_answers(servers, "POST", "/tokenize", {"content": "hi", "with_pieces": True})
    assert_same_answers(servers, "POST", "/detokenize", {"tokens": [300, 301]})


def test_errors_have_the_real_shape(servers: Pair) -> None:
    for path in ("/v1/chat/completions", "/completion", "/v1/completions"):
        (rs, real_raw), (fs, fake_raw) = both(servers, "POST", path, raw=b"{not json")
        assert rs == fs == 400, path
        assert_same_shape(json.loads(real_raw), json.loads(fake_raw), f"bad JSON to {path}")
    assert_same_answers(servers, "POST", "/v1/chat/completions", {})
    assert_same_answers(servers, "GET", "/no/such/path")


def test_metrics_have_the_real_names(servers: Pair) -> None:
    def names(raw: bytes) -> set[str]:
        return {line.split()[0] for line in raw.decode().splitlines() if line[:1] not in "#"}

    (rs, real_raw), (fs, fake_raw) = both(servers, "GET", "/metrics")
    assert rs == fs == 200
    assert names(fake_raw) == names(real_raw)


def test_embeddings_have_the_real_shape(embedding_servers: Pair) -> None:
    pair = embedding_servers
    assert_same_answers(pair, "POST", "/v1/embeddings", {"input": "hello there"})
    assert_same_answers(pair, "POST", "/v1/embeddings", {"input": ["a b", "c"], "model": "x"})
    assert_same_answers(pair, "POST", "/embedding", {"content": "hello there"})
    assert_same_answers(pair, "POST", "/v1/embeddings", {"input": []})


def test_shape_comparison_catches_differences() -> None:
    """The comparison itself must fail on a missing key, an extra key or a wrong type."""
    real = {"a": 1, "b": [{"c": "x"}], "d": 1.5}
    assert shape_differences(real, {"a": 2, "b": [{"c": "y"}, {"c": "z"}], "d": 2.0}) == []
    assert shape_differences(real, {"a": 1, "b": [{"c": "x"}]}) == ["$.d: missing from the fake"]
    assert shape_differences(real, {**real, "e": 0}) == ["$.e: only in the fake"]
    assert shape_differences(real, {**real, "d": 1}) == ["$.d: real is float, fake is int"]
    assert shape_differences(real, {**real, "b": [{"c": 1}]}) == [
        "$.b[].c: real is string, fake is int"
    ]
