"""``corral balancer`` with two ``corral agent`` processes beside two real llama-servers.

The multi-host shape on one machine: every part its own process, the official
``openai`` client in front, and both llama-servers taking requests.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.net import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real

START_S = 60.0
MANAGEMENT: dict[str, str] = {}
"""The management address of each front door."""


def _wait(
    what: str, condition: Callable[[], bool], procs: list[tuple[subprocess.Popen[bytes], Path]]
) -> None:
    wait_until(condition, what, START_S, watch=procs)


@pytest.fixture(scope="module")
def front_door(
    llama_server_bin: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("balancer-real")
    env = {
        **os.environ,
        "CORRAL_MANAGEMENT_TOKEN": "m-token",
        "CORRAL_CLUSTER_TOKEN": "c-token",
        "CORRAL_STATE_DIR": str(tmp),
    }
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spawn(name: str, args: list[str]) -> None:
        log = tmp / f"{name}.log"
        with log.open("wb") as out:
            procs.append(
                (subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env), log)
            )

    try:
        inference, management = free_port(), free_port()
        spawn("balancer", [
            sys.executable, "-m", "corral.cli", "balancer",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}",
        ])  # fmt: skip
        for n in range(2):
            port = free_port()
            spawn(f"llama-server-{n}", [
                str(llama_server_bin), "--model", str(tiny_model), "--host", "127.0.0.1",
                "--port", str(port), "--parallel", "2", "--ctx-size", "2048",
            ])  # fmt: skip
            spawn(f"agent-{n}", [
                sys.executable, "-m", "corral.cli", "agent",
                "--local-llama-server", f"http://127.0.0.1:{port}",
                "--balancer", f"127.0.0.1:{management}", "--name", f"host-{n}",
            ])  # fmt: skip
        base = f"http://127.0.0.1:{inference}"

        def two_ready() -> bool:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    return b'"instances_ready": 2' in response.read()
            except OSError:
                return False

        _wait("two ready instances", two_ready, procs)
        MANAGEMENT[base] = f"127.0.0.1:{management}"
        yield base
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(10)


def test_openai_client_is_served_by_both_real_instances(front_door: str) -> None:
    client = OpenAI(base_url=front_door + "/v1", api_key="unused", max_retries=0)
    instances: collections.Counter[str] = collections.Counter()
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4
        )
        assert raw.parse().choices[0].finish_reason == "length"
        instances[raw.headers["X-Corral-Instance"]] += 1
    assert len(instances) == 2, instances


def test_openai_client_streams_from_both_real_instances(front_door: str) -> None:
    client = OpenAI(base_url=front_door + "/v1", api_key="unused", max_retries=0)
    instances: set[str] = set()
    for i in range(6):
        with client.chat.completions.with_streaming_response.create(
            model="tiny",
            messages=[{"role": "user", "content": f"stream {i}"}],
            max_tokens=4,
            stream=True,
        ) as response:
            instances.add(response.headers["X-Corral-Instance"])
            text = "".join(line for line in response.iter_lines())
            assert re.search(r'"finish_reason":\s*"length"', text), text
    assert len(instances) == 2


def _generated_tokens(front_door: str) -> float:
    """corral_generated_tokens_total summed over instances."""
    request = urllib.request.Request(
        f"http://{MANAGEMENT[front_door]}/metrics", headers={"Authorization": "Bearer m-token"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("corral_generated_tokens_total{")
    )


def test_generated_tokens_are_counted_from_real_responses_streamed_and_not(
    front_door: str,
) -> None:
    client = OpenAI(base_url=front_door + "/v1", api_key="unused", max_retries=0)
    before = _generated_tokens(front_door)
    for i in range(3):
        plain = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=4
        )
        assert plain.usage is not None and plain.usage.completion_tokens == 4
    for i in range(3):
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"count stream {i}"}],
            max_tokens=4,
            stream=True,
        )
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
        assert finishes[-1] == "length"  # 4 tokens generated
    # the client may read a stream's last byte before corral counts it: wait for the
    # count to settle (bounded), then it must be exact, never more
    deadline = time.monotonic() + 10
    while _generated_tokens(front_door) - before < 6 * 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _generated_tokens(front_door) - before == 6 * 4
