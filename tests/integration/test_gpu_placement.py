"""Models placed by GPU memory on a host with two GPUs, through ``corral serve``.

The fake llama-server lists two made-up devices (``CORRAL_FAKE_DEVICES``, as
``--list-devices`` prints them), takes ``--device`` as llama-server does (refusing a
name it does not list) and, with ``--oom-on DEVICE``, fails to start on that device with
llama.cpp's out-of-memory lines. The models are real tiny GGUFs, so the estimate counts
their real layers: each needs about 515 MiB on a device (mostly the compute allowance),
so two do not fit one 1000 MiB device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from corral.catalog.memory import DEVICE_OVERHEAD_BYTES
from corral.catalog.tiny import make_tiny_model
from corral.serve import LocalServe
from tests.support.local_serve import complete, serving_table, settled
from tests.support.serve_fake import fake_binary

MIB = 2**20
DEVICES = "Fake0|fake GPU|1200|1000;Fake1|fake GPU|1200|900"


def table(tmp_path: Path, *names: str, **args: list[str]) -> dict[str, dict[str, object]]:
    entries: dict[str, dict[str, object]] = {}
    for name in names:
        path = make_tiny_model(tmp_path / f"{name}.gguf", seed=len(entries))
        entries[name] = {"path": str(path), "args": args.get(name, [])}
    return entries


def device_arg(local: LocalServe, key: str) -> str | None:
    assert local.host is not None
    args = local.host.running[key].managed.supervisor.args
    return args[args.index("--device") + 1] if "--device" in args else None


async def test_two_models_go_to_two_gpus_and_a_third_evicts_on_the_device_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_FAKE_DEVICES", DEVICES)
    models = table(tmp_path, "a", "b", "c")
    async with serving_table(tmp_path, monkeypatch, models, fake_binary(tmp_path)) as (
        local,
        base,
        http,
    ):
        host = local.host
        assert host is not None
        assert (await complete(http, base, "a"))[0] == 200
        assert device_arg(local, "a") == "Fake0"  # the device with the most free memory
        need = host.running["a"].devices["Fake0"]
        assert DEVICE_OVERHEAD_BYTES < need < 1000 * MIB / 2 + 50 * MIB  # two do not fit
        assert (await complete(http, base, "b"))[0] == 200
        assert device_arg(local, "b") == "Fake1"  # a took Fake0's room
        assert {d.name for d in host.devices} == {"Fake0", "Fake1"}
        view = host.device_memory()
        assert view["Fake0"] == (1200 * MIB, 1000 * MIB - need)
        # c fits neither as things are: the least recently used model on the device with
        # the most room goes (a, on Fake0), and c takes its place there
        assert (await complete(http, base, "c"))[0] == 200
        assert await settled(local) == {"b": "loaded", "c": "loaded"}
        assert device_arg(local, "c") == "Fake0"
        assert host.running["c"].placed == ("Fake0",)


async def test_a_model_that_runs_out_of_memory_on_a_gpu_is_not_started_there_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CORRAL_FAKE_DEVICES", DEVICES)
    models = table(tmp_path, "big", big=["--oom-on", "Fake0"])
    caplog.set_level(logging.INFO)
    async with serving_table(tmp_path, monkeypatch, models, fake_binary(tmp_path)) as (
        local,
        base,
        http,
    ):
        host = local.host
        assert host is not None
        status, body = await complete(http, base, "big")
        assert status == 503, body
        message = body["error"]["message"]
        # what happened, where, with the numbers: llama.cpp's request, corral's estimate
        assert "failed to start" in message
        assert "out of memory on Fake0 (an allocation of 1024.0 MiB failed)" in message
        assert "corral estimated" in message and "on Fake0, which has 1000.0 MiB free" in message
        assert "not tried on that device again" in message
        assert host.out_of_memory == {"big": {"Fake0": 1000 * MIB}}
        # one launch: an out-of-memory start is not restarted into the same wall
        starts = [r for r in caplog.records if "instance down name=llama-server:big" in r.message]
        assert starts == []
        # the next request places it on the other GPU, where it starts
        assert (await complete(http, base, "big"))[0] == 200
        assert device_arg(local, "big") == "Fake1"
        assert host.loads == 2
