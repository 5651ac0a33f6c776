"""One fleet across real network hosts: the balancer and two model hosts each in a Linux
network namespace of their own, joined by veth links, and a partition made and healed.

Layout (addresses on /24 links)::

    test (root ns) 10.77.0.1 ── 10.77.0.2 balancer ns 10.77.1.1 ── 10.77.1.2 host one
                                                      10.77.2.1 ── 10.77.2.2 host two

Needs root (CI runs as root) and ``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from corral.catalog.tiny import make_tiny_model
from tests.support.processes import CLUSTER_TOKEN, MANAGEMENT_TOKEN
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for

AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
BALANCER = "10.77.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = uuid.uuid4().hex[:6]
    names = {"balancer": f"cb-{tag}", "one": f"c1-{tag}", "two": f"c2-{tag}"}
    made: list[str] = []
    try:
        for name in names.values():
            ip("netns", "add", name)
            made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        links = [
            (None, "10.77.0.1", names["balancer"], BALANCER, f"vr{tag}", f"vb{tag}"),
            (names["balancer"], "10.77.1.1", names["one"], "10.77.1.2", f"b1{tag}", f"h1{tag}"),
            (names["balancer"], "10.77.2.1", names["two"], "10.77.2.2", f"b2{tag}", f"h2{tag}"),
        ]
        for left_ns, left_ip, right_ns, right_ip, left, right in links:
            ip("link", "add", left, "type", "veth", "peer", "name", right)
            ip("link", "set", right, "netns", right_ns)
            if left_ns is not None:
                ip("link", "set", left, "netns", left_ns)
            for ns, dev, addr in ((left_ns, left, left_ip), (right_ns, right, right_ip)):
                prefix = ["-n", ns] if ns is not None else []
                ip(*prefix, "addr", "add", f"{addr}/24", "dev", dev)
                ip(*prefix, "link", "set", dev, "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc}")
    names["link_two"] = f"b2{tag}"
    names["root_link"] = f"vr{tag}"
    try:
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", f"vr{tag}"], check=False, capture_output=True)


async def spawn(ns: str, tmp: Path, name: str, *args: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "CORRAL_STATE_DIR": str(tmp / f"state-{name}"),
        "CORRAL_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "CORRAL_CLUSTER_TOKEN": CLUSTER_TOKEN,
    }
    log = (tmp / f"{name}.log").open("wb")
    return await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        "corral.cli",
        *args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


async def test_a_partitioned_host_leaves_the_pool_and_comes_back_when_it_heals(
    namespaces: dict[str, str], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    procs: list[asyncio.subprocess.Process] = []
    try:
        procs.append(
            await spawn(
                namespaces["balancer"],
                tmp_path,
                "balancer",
                "balancer",
                "--inference-addr",
                "0.0.0.0:18080",
                "--management-addr",
                "0.0.0.0:18085",
            )
        )
        for name, link, models in (("one", "10.77.1", ["near"]), ("two", "10.77.2", ["far"])):
            folder = tmp_path / name
            folder.mkdir()
            for model in models:
                make_tiny_model(folder / f"{model}.gguf")
            where = tmp_path / f"bin-{name}"
            where.mkdir()
            procs.append(
                await spawn(
                    namespaces[name],
                    tmp_path,
                    f"host-{name}",
                    "agent",
                    "--balancer",
                    f"{link}.1:18085",
                    "--models-dir",
                    str(folder),
                    "--llama-server",
                    str(fake_binary(where)),
                    "--name",
                    name,
                    "--llama-server-host",
                    "0.0.0.0",
                    "--external-llama-server",
                    f"http://{link}.2",
                )
            )
        base = f"http://{BALANCER}:18080"

        async def offered() -> bool:
            try:
                async with http.get(base + "/v1/models") as response:
                    ids = {m["id"] for m in (await response.json())["data"]}
            except aiohttp.ClientError:
                return False
            return ids == {"near", "far"}

        await wait_for(offered, "both hosts' models across the links", limit_s=30)

        async def chat(model: str) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(base + "/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        assert await chat("far") == 200  # started on host two, reached over its link
        assert await chat("near") == 200

        async def far_usable() -> Any:
            async with http.get(f"http://{BALANCER}:18085/api/v1/fleet", headers=AUTH) as r:
                fleet = await r.json()
            return [i["usable"] for i in fleet["instances"] if i["model"] == "far"]

        assert await far_usable() == [True]
        # partition: host two's link down; its instance leaves the pool in bounded time
        ip("-n", namespaces["balancer"], "link", "set", namespaces["link_two"], "down")
        await wait_for(
            lambda: _not(far_usable()), "host two's instance out of the pool", limit_s=15
        )
        assert await chat("near") == 200  # the rest of the fleet serves on
        # heal: it comes back (its server still runs: adopted, not loaded again)
        ip("-n", namespaces["balancer"], "link", "set", namespaces["link_two"], "up")

        async def back() -> bool:
            return await far_usable() == [True]

        await wait_for(back, "host two's instance back in the pool", limit_s=40)
        assert await chat("far") == 200
        log = (tmp_path / "host-two.log").read_text()
        assert log.count("loaded key=far") == 1, log  # one server through it all
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()


async def _not(usable: Any) -> bool:
    return True not in await usable
