"""One fleet on the real llama-server: ``corral balancer`` and two model hosts
(``corral agent --models-dir``) with different tiny models, each starting the real
llama-server when the balancer asks. The official ``openai`` client asks for a model
only the second host has; it starts there and answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from corral.catalog.tiny import make_tiny_model
from tests.support.net import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.real


def test_the_openai_client_gets_a_model_only_the_second_host_has(
    llama_server_bin: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CORRAL_MANAGEMENT_TOKEN": "m-token",
        "CORRAL_CLUSTER_TOKEN": "c-token",
        "CORRAL_STATE_DIR": str(tmp_path),
    }
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spawn(name: str, args: list[str]) -> None:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            procs.append(
                (subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env), log)
            )

    inference, management = free_port(), free_port()
    try:
        spawn("balancer", [
            sys.executable, "-m", "corral.cli", "balancer",
            "--inference-addr", f"127.0.0.1:{inference}",
            "--management-addr", f"127.0.0.1:{management}",
        ])  # fmt: skip
        for name, models in (("first", ["north"]), ("second", ["south"])):
            folder = tmp_path / name
            folder.mkdir()
            for model in models:
                make_tiny_model(folder / f"{model}.gguf", seed=len(procs))
            spawn(f"host-{name}", [
                sys.executable, "-m", "corral.cli", "agent", "--models-dir", str(folder),
                "--balancer", f"127.0.0.1:{management}", "--name", name,
                "--llama-server", str(llama_server_bin),
            ])  # fmt: skip
        base = f"http://127.0.0.1:{inference}"

        def both_offered() -> bool:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=2) as response:
                    ids = {m["id"] for m in json.load(response)["data"]}
            except OSError:
                return False
            return ids == {"north", "south"}

        wait_until(both_offered, "both hosts' models listed", 60.0, watch=procs)
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="south",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
        )
        assert answer.model == "south"
        assert answer.usage is not None and answer.usage.completion_tokens == 4
        request = urllib.request.Request(
            f"http://127.0.0.1:{management}/api/v1/fleet",
            headers={"Authorization": "Bearer m-token"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            fleet = json.load(response)
        names = {a["id"]: a["name"] for a in fleet["agents"]}
        (instance,) = fleet["instances"]  # north was never asked for: nothing runs it
        assert (instance["model"], names[instance["agent_id"]]) == ("south", "second")
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
