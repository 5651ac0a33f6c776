"""Drop-in, against the real llama-server: the same requests straight to it and through
corral give the same answers (issue 24).

One real llama-server is asked directly and through ``corral balancer`` + ``corral
agent`` in front of that very server, and ``corral serve`` starts another with the same
arguments; every request is sent to all three. What must match: the status, the
``Content-Type``, the JSON shape (keys and value types, recursively; values such as ids
and timings differ by nature), the CORS headers. Where corral differs on purpose the
test says so, and ``docs/design.md`` ("Drop-in") says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port
from tests.support.serve_process import start_serve
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

START_S = 60.0
MANAGEMENT_TOKEN = "drop-in-management"
CLUSTER_TOKEN = "drop-in-cluster"
LLAMA_ARGS = ["--parallel", "2", "--ctx-size", "2048", "--metrics"]
HELLO = [{"role": "user", "content": "Hello"}]


# ------------------------------------------------------------------ the processes
@dataclass
class Stack:
    """Processes started for one set-up; every one is killed at the end."""

    tmp: Path
    procs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    management: dict[str, str] = field(default_factory=dict)
    """The management URL of each front door, by its inference URL."""

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = self.tmp / f"{name}.log"
        environ = {
            **os.environ,
            "CORRAL_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "CORRAL_CLUSTER_TOKEN": CLUSTER_TOKEN,
            "CORRAL_STATE_DIR": str(self.tmp),
            **(env or {}),
        }
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environ)
        self.procs.append((process, log))

    def llama_server(self, binary: Path, model: Path, *args: str) -> str:
        port = free_port()
        self.spawn(f"llama-server-{port}", [
            str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            *LLAMA_ARGS, *args,
        ])  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        self.wait(f"llama-server on {port}", lambda: _status(url + "/health") == 200)
        return url

    def balancer(self, llama_server: str, *, agent_args: tuple[str, ...] = (), **kw: Any) -> str:
        inference, management = free_port(), free_port()
        self.spawn(f"balancer-{inference}", [
            sys.executable, "-m", "corral.cli", "balancer",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}", *kw.get("args", ()),
        ], env=kw.get("env"))  # fmt: skip
        self.spawn(f"agent-{inference}", [
            sys.executable, "-m", "corral.cli", "agent", "--local-llama-server", llama_server,
            "--balancer", f"127.0.0.1:{management}", *agent_args,
        ], env=kw.get("agent_env"))  # fmt: skip
        base = f"http://127.0.0.1:{inference}"
        self.management[base] = f"http://127.0.0.1:{management}"
        self.wait("the balancer's instance", lambda: _ready(base))
        return base

    def front(self, llama_server: str) -> str:
        """``corral balancer --local-llama-server URL``: the one command in front of a
        llama-server a user already runs."""
        inference, management = free_port(), free_port()
        self.spawn(f"front-{inference}", [
            sys.executable, "-m", "corral.cli", "balancer",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}",
            "--local-llama-server", llama_server,
        ])  # fmt: skip
        base = f"http://127.0.0.1:{inference}"
        self.management[base] = f"http://127.0.0.1:{management}"
        self.wait("the one-command balancer's instance", lambda: _ready(base))
        return base

    def serve(self, binary: Path, model: Path, *args: str, **kw: Any) -> str:
        tmp = self.tmp / f"serve-{len(self.procs)}"
        tmp.mkdir()
        started = start_serve(
            tmp, binary, model, MANAGEMENT_TOKEN, serve_args=kw.get("args", ()),
            llama_args=[*LLAMA_ARGS, *args], env=kw.get("env"),
        )  # fmt: skip
        self.procs.append((started.process, started.log_path))
        self.management[started.base] = started.management
        self.wait("corral serve's instance", lambda: _ready(started.base))
        return started.base

    def wait(self, what: str, condition: Any) -> None:
        wait_until(condition, what, START_S, watch=self.procs)

    def close(self) -> None:
        for process, _ in self.procs:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def _status(url: str) -> int | None:
    try:
        return _open("GET", url, None, {}, timeout=2)[0]
    except OSError:
        return None


def _ready(base: str) -> bool:
    try:
        status, _, body = _open("GET", base + "/health", None, {}, timeout=2)
    except OSError:
        return False
    return status == 200 and json.loads(body).get("instances_ready", 0) >= 1


def _open(
    method: str, url: str, body: Any, headers: dict[str, str], timeout: float = 60
) -> tuple[int, Message, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture(scope="module")
def doors(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """``direct`` (the llama-server), ``balancer`` (balancer + agent in front of it) and
    ``front`` (``corral balancer --local-llama-server`` in front of it, one command) and
    ``serve`` (corral serve with the same model and arguments)."""
    stack = Stack(tmp_path_factory.mktemp("drop-in"))
    saves = stack.tmp / "slots"
    saves.mkdir()
    try:
        direct = stack.llama_server(llama_server_bin, tiny_model, "--slot-save-path", str(saves))
        yield {
            "direct": direct,
            "balancer": stack.balancer(direct),
            "front": stack.front(direct),
            "serve": stack.serve(llama_server_bin, tiny_model, "--slot-save-path", str(saves)),
        }
    finally:
        stack.close()


# ------------------------------------------------------------------ comparing answers
def shape(value: Any) -> Any:
    """Keys and value types, recursively; numbers are one type (llama-server writes a
    double with no fraction as an integer), a list is the set of its items' shapes."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            if shape(item) not in shapes:
                shapes.append(shape(item))
        return shapes
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


@dataclass
class Answer:
    status: int
    content_type: str
    headers: Message
    body: Any

    def compared(self) -> tuple[int, str, Any]:
        return self.status, self.content_type, shape(self.body)


def ask(base: str, method: str, path: str, body: Any = None, **headers: str) -> Answer:
    status, head, raw = _open(method, base + path, body, headers)
    content_type = (head.get("Content-Type") or "").split(";")[0].strip()
    try:
        data: Any = json.loads(raw)
    except ValueError:
        data = raw.decode(errors="replace")
    return Answer(status, content_type, head, data)


def stream_events(base: str, path: str, body: Any) -> tuple[int, str, list[Any]]:
    """Status, content type and the shapes of a stream's ``data:`` events, in order of
    first appearance."""
    status, head, raw = _open("POST", base + path, body, {})
    content_type = (head.get("Content-Type") or "").split(";")[0].strip()
    shapes: list[Any] = []
    for line in raw.decode().splitlines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        item = "[DONE]" if payload == "[DONE]" else shape(json.loads(payload))
        if item not in shapes:
            shapes.append(item)
    return status, content_type, shapes


CASES: list[tuple[str, str, str, Any]] = [
    ("chat, a name corral does not know", "POST", "/v1/chat/completions",
     {"model": "gpt-3.5-turbo", "messages": HELLO, "max_tokens": 4}),
    ("chat, an HF repo id", "POST", "/v1/chat/completions",
     {"model": "TheBloke/Llama-2-7B-GGUF", "messages": HELLO, "max_tokens": 4}),
    ("chat, no model", "POST", "/chat/completions", {"messages": HELLO, "max_tokens": 4}),
    ("completion", "POST", "/v1/completions", {"model": "test", "prompt": "Hi", "max_tokens": 4}),
    ("native completion", "POST", "/completion", {"prompt": "Hi", "n_predict": 4}),
    ("anthropic messages", "POST", "/v1/messages",
     {"model": "claude-3-5-haiku", "messages": HELLO, "max_tokens": 4}),
    ("anthropic count_tokens", "POST", "/v1/messages/count_tokens",
     {"model": "claude-3-5-haiku", "messages": HELLO}),
    ("responses", "POST", "/v1/responses",
     {"model": "gpt-4o", "input": "Hello", "max_output_tokens": 4}),
    ("tokenize", "POST", "/tokenize", {"content": "Hello world", "with_pieces": True}),
    ("detokenize", "POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("apply-template", "POST", "/apply-template", {"messages": HELLO}),
    ("props", "GET", "/props", None),
    ("slot action unknown", "POST", "/slots/0?action=nonsense", {}),
    ("a route llama-server does not have", "GET", "/no/such/route", None),
    ("a bad body", "POST", "/v1/chat/completions", {"model": "x", "messages": "not a list"}),
]  # fmt: skip


@pytest.mark.parametrize(("what", "method", "path", "body"), CASES, ids=[c[0] for c in CASES])
def test_the_same_request_gets_the_same_answer_through_corral(
    doors: dict[str, str], what: str, method: str, path: str, body: Any
) -> None:
    direct = ask(doors["direct"], method, path, body)
    assert direct.status < 500, direct.body
    for door in ("balancer", "front", "serve"):
        through = ask(doors[door], method, path, body)
        assert through.compared() == direct.compared(), (door, through.body, direct.body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 4}),
        ("/v1/completions", {"model": "test", "prompt": "Hi", "max_tokens": 4}),
        ("/v1/messages", {"model": "claude", "messages": HELLO, "max_tokens": 4}),
        ("/v1/responses", {"model": "gpt-4o", "input": "Hello", "max_output_tokens": 4}),
    ],
    ids=["chat", "completion", "messages", "responses"],
)
def test_a_stream_is_the_same_through_corral(
    doors: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    body = {**body, "stream": True}
    direct = stream_events(doors["direct"], path, body)
    assert direct[0] == 200 and direct[2]
    for door in ("balancer", "front", "serve"):
        assert stream_events(doors[door], path, body) == direct, door


def test_the_answer_names_the_model_that_answered(doors: dict[str, str]) -> None:
    body = {"model": "gpt-3.5-turbo", "messages": HELLO, "max_tokens": 2}
    direct = ask(doors["direct"], "POST", "/v1/chat/completions", body)
    through = ask(doors["balancer"], "POST", "/v1/chat/completions", body)
    assert through.body["model"] == direct.body["model"] != "gpt-3.5-turbo"


def test_metrics_are_the_instance_own(doors: dict[str, str]) -> None:
    def names(base: str) -> set[str]:
        answer = ask(base, "GET", "/metrics")
        assert answer.status == 200 and answer.content_type == "text/plain", answer.body
        return {line.split()[0] for line in answer.body.splitlines() if line and line[0] != "#"}

    direct = names(doors["direct"])
    assert "llamacpp:requests_processing" in direct
    assert names(doors["balancer"]) == names(doors["front"]) == names(doors["serve"]) == direct


def test_differences_on_purpose(doors: dict[str, str]) -> None:
    """``/health`` and ``/v1/models`` answer for the whole front door, not one server
    (docs/design.md, "Drop-in"); each keeps llama-server's keys and adds its own."""
    direct = ask(doors["direct"], "GET", "/health")
    assert direct.body == {"status": "ok"}
    for door in ("balancer", "front", "serve"):
        health = ask(doors[door], "GET", "/health")
        assert health.status == 200 and health.body["status"] == "ok"
        assert health.body["instances_ready"] == 1
        models = ask(doors[door], "GET", "/v1/models")
        direct_models = ask(doors["direct"], "GET", "/v1/models")
        assert models.status == direct_models.status == 200
        assert {"object", "data"} <= set(models.body) and models.body["data"]
        assert {"id", "object", "created", "owned_by"} <= set(models.body["data"][0])


def test_slots_and_slot_actions_are_the_instance_own(doors: dict[str, str]) -> None:
    """``GET /slots`` in llama-server's shape, and save, restore and erase of a slot's
    KV cache acting on the one instance behind the door."""
    for door, base in doors.items():
        slots = ask(base, "GET", "/slots")
        assert slots.status == 200 and [s["id"] for s in slots.body] == [0, 1], door
        for slot in slots.body:
            assert {"id", "n_ctx", "is_processing", "speculative"} <= set(slot), door
        done = ask(
            base, "POST", "/completion", {"prompt": "Hello there", "n_predict": 2, "id_slot": 0}
        )
        assert done.status == 200, (door, done.body)
        saved = ask(base, "POST", "/slots/0?action=save", {"filename": f"{door}.bin"})
        assert saved.status == 200 and saved.body["n_saved"] > 0, (door, saved.body)
        restored = ask(base, "POST", "/slots/1?action=restore", {"filename": f"{door}.bin"})
        assert restored.status == 200, (door, restored.body)
        assert restored.body["n_restored"] == saved.body["n_saved"], door
        erased = ask(base, "POST", "/slots/1?action=erase", {})
        assert erased.status == 200 and erased.body["n_erased"] > 0, (door, erased.body)
        assert set(saved.body) == {"id_slot", "filename", "n_saved", "n_written", "timings"}


# ------------------------------------------------------------------ other set-ups
def _instances(stack: Stack, base: str) -> list[dict[str, Any]]:
    status, _, body = _open(
        "GET", stack.management[base] + "/api/v1/instances", None,
        {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
    )  # fmt: skip
    assert status == 200
    instances: list[dict[str, Any]] = json.loads(body)["instances"]
    return instances


CORS_ARGS = ("--cors-origins", "http://localhost:3000")


@pytest.fixture(scope="module")
def cors_doors(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    stack = Stack(tmp_path_factory.mktemp("drop-in-cors"))
    try:
        direct = stack.llama_server(llama_server_bin, tiny_model, *CORS_ARGS)
        yield {
            "direct": direct,
            "balancer": stack.balancer(direct),
            "serve": stack.serve(llama_server_bin, tiny_model, *CORS_ARGS),
        }
    finally:
        stack.close()


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://elsewhere.example"])
@pytest.mark.parametrize(
    ("method", "path"), [("OPTIONS", "/v1/chat/completions"), ("GET", "/props")]
)
def test_cors_is_llama_server_own_for_an_allowed_and_a_refused_origin(
    cors_doors: dict[str, str], origin: str, method: str, path: str
) -> None:
    headers = {"Origin": origin}
    if method == "OPTIONS":
        headers |= {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        }

    def answer(base: str) -> tuple[int, dict[str, str]]:
        status, head, _ = _open(method, base + path, None, headers)
        cors = {k.lower(): v for k, v in head.items() if k.lower().startswith("access-control-")}
        return status, cors

    direct = answer(cors_doors["direct"])
    allowed = origin == "http://localhost:3000"
    # a refused origin gets the configured one back, which the browser then refuses
    assert (direct[1].get("access-control-allow-origin") == origin) is allowed, direct
    for door in ("balancer", "serve"):
        assert answer(cors_doors[door]) == direct, door


def _chat(base: str, **headers: str) -> Answer:
    body = {"model": "gpt-4o-mini", "messages": HELLO, "max_tokens": 2}
    return ask(base, "POST", "/v1/chat/completions", body, **headers)


def test_a_no_slots_llama_server_is_served(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    stack = Stack(tmp_path)
    try:
        direct = stack.llama_server(llama_server_bin, tiny_model, "--no-slots")
        doors = {
            "balancer": stack.balancer(direct),
            "serve": stack.serve(llama_server_bin, tiny_model, "--no-slots"),
        }
        assert ask(direct, "GET", "/slots").status == 501
        for door, base in doors.items():
            assert _chat(base).compared() == _chat(direct).compared(), door
            assert ask(base, "GET", "/slots").compared() == ask(direct, "GET", "/slots").compared()
            (instance,) = _instances(stack, base)
            assert instance["usable"] and instance["slot_source"] == "metrics", (door, instance)
    finally:
        stack.close()


def _sleeping(base: str) -> bool:
    answer = ask(base, "GET", "/props")
    assert answer.status == 200, answer.body
    return bool(answer.body["is_sleeping"])


def test_a_sleeping_llama_server_sleeps_behind_corral_and_a_request_wakes_it(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The agent's reads must not count as activity (``/slots`` does), or the server
    never sleeps; asleep it stays usable, and the next request wakes it."""
    stack = Stack(tmp_path)
    sleep = ("--sleep-idle-seconds", "1")
    try:
        direct = stack.llama_server(llama_server_bin, tiny_model, *sleep)
        doors = {
            # an agent watching a server it did not start is told; serve sees the flag
            "balancer": stack.balancer(direct, agent_args=("--slot-source", "balancer")),
            "serve": stack.serve(llama_server_bin, tiny_model, *sleep),
        }
        for door, base in doors.items():
            stack.wait(f"{door}'s llama-server to sleep", lambda b=base: _sleeping(b))
            stack.wait(
                f"{door} to report it sleeping",
                lambda b=base: _instances(stack, b)[0]["sleeping"],
            )
            (instance,) = _instances(stack, base)
            assert instance["usable"] and instance["slot_source"] == "balancer", instance
            answer = _chat(base)
            assert answer.status == 200, answer.body
            assert not _sleeping(base)  # woken by the request, not by corral's reads
    finally:
        stack.close()


SERVER_KEY, CLIENT_KEY = "server-key", "client-key"


def _statuses(base: str) -> dict[str, int]:
    return {
        "none": _chat(base).status,
        "client key": _chat(base, Authorization=f"Bearer {CLIENT_KEY}").status,
        "server key": _chat(base, Authorization=f"Bearer {SERVER_KEY}").status,
        "server key as x-api-key": _chat(base, **{"x-api-key": SERVER_KEY}).status,
    }


def test_keys_in_the_three_set_ups(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    stack = Stack(tmp_path)
    server_key = {"CORRAL_LLAMA_SERVER_API_KEY": SERVER_KEY}
    try:
        plain = stack.llama_server(llama_server_bin, tiny_model)
        keyed = stack.llama_server(llama_server_bin, tiny_model, "--api-key", SERVER_KEY)
        assert _statuses(keyed) == {
            "none": 401, "client key": 401, "server key": 200, "server key as x-api-key": 200,
        }  # fmt: skip
        only_corral = {
            "balancer": stack.balancer(plain, env={"CORRAL_API_KEYS": CLIENT_KEY}),
            "serve": stack.serve(llama_server_bin, tiny_model, env={"CORRAL_API_KEYS": CLIENT_KEY}),
        }
        for door, base in only_corral.items():
            assert _statuses(base) == {
                "none": 401, "client key": 200, "server key": 401,
                "server key as x-api-key": 401,
            }, door  # fmt: skip
        only_server = {
            "balancer": stack.balancer(keyed, agent_env=server_key),
            "serve": stack.serve(llama_server_bin, tiny_model, "--api-key", SERVER_KEY),
        }
        for door, base in only_server.items():
            assert _statuses(base) == _statuses(keyed), door  # llama-server checks the key
        both = {
            "balancer": stack.balancer(
                keyed, agent_env=server_key, env={"CORRAL_API_KEYS": CLIENT_KEY, **server_key}
            ),
            "serve": stack.serve(
                llama_server_bin, tiny_model, "--api-key", SERVER_KEY,
                env={"CORRAL_API_KEYS": CLIENT_KEY, **server_key},
            ),
        }  # fmt: skip
        for door, base in both.items():
            assert _statuses(base) == {
                "none": 401, "client key": 200, "server key": 401,
                "server key as x-api-key": 401,
            }, door  # fmt: skip
    finally:
        stack.close()


EMBEDDINGS = ("--embeddings", "--pooling", "mean")  # the tiny model names no pooling


def test_embeddings_with_an_embeddings_server(
    llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    stack = Stack(tmp_path)
    try:
        direct = stack.llama_server(llama_server_bin, tiny_model, *EMBEDDINGS)
        doors = {
            "front": stack.front(direct),
            "serve": stack.serve(llama_server_bin, tiny_model, *EMBEDDINGS),
        }
        cases = [
            ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["hello", "world"]}),
            ("/v1/embeddings", {"input": "hello", "encoding_format": "base64"}),
            ("/embeddings", {"content": "hello"}),
            ("/embedding", {"content": "hello"}),
        ]
        for path, body in cases:
            expected = ask(direct, "POST", path, body)
            assert expected.status == 200, (path, expected.body)
            for door, base in doors.items():
                assert ask(base, "POST", path, body).compared() == expected.compared(), door
    finally:
        stack.close()
