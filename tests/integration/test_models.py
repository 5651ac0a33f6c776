"""Many models in one ``corral serve``: on-demand loading, eviction, groups, TTL, reload.

Each test runs a real :class:`~corral.serve.LocalServe` (balancer, model host, agents
over loopback WebSockets) whose llama-server binary is the fake, so every start and
stop is a real process and every request real HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from corral.config import ConfigError, Settings, load_settings
from corral.serve import LocalServe, ServeOptions
from tests.support.local_serve import (
    AUTH,
    TOKEN,
    chat,
    complete,
    pid_of,
    running,
    serving,
    serving_table,
    settled,
    stream_through,
)
from tests.support.serve_fake import fake_binary
from tests.support.waiting import wait_for


async def test_one_start_for_many_concurrent_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"args": ["--load-delay", "0.5", "-np", "2"]}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        assert running(local) == {}
        results = await asyncio.gather(*(complete(http, base, "a") for _ in range(20)))
        assert [status for status, _ in results] == [200] * 20
        assert local.host is not None and local.host.loads == 1
        assert await settled(local) == {"a": "loaded"}


async def test_no_in_flight_request_is_killed_by_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = ["--token-delay", "0.1", "--tokens", "15", "-np", "3"]
    async with serving(tmp_path, monkeypatch, {"a": {"args": slow}, "b": {}}, max_instances=1) as (
        local,
        base,
        http,
    ):
        started = 0

        def first() -> None:
            nonlocal started
            started += 1

        streams = [asyncio.create_task(stream_through(http, base, "a", first)) for _ in range(3)]
        await wait_for(lambda: started == 3, "three streams from a to begin")
        status, _ = await complete(http, base, "b")  # needs a's place: a drains first
        finished_b = time.monotonic()
        assert status == 200
        results = await asyncio.gather(*streams)
        for status, body in results:
            assert status == 200
            assert '"finish_reason":"stop"' in body.replace(" ", "") and "[DONE]" in body
            assert "error" not in body
        assert all(s.done() for s in streams)
        assert finished_b > 0 and await settled(local) == {"b": "loaded"}


async def test_alternating_models_are_served_in_batches_not_a_swap_per_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["-np", "8", "--token-delay", "0.02"]
    models = {"a": {"args": args}, "b": {"args": args}}
    async with serving(tmp_path, monkeypatch, models, max_instances=1) as (local, base, http):
        order = ["a", "b"] * 8  # A, B, A, B ... all at once
        results = await asyncio.gather(*(complete(http, base, m) for m in order))
        assert [status for status, _ in results] == [200] * 16
        assert [body["model"] for _, body in results] == order
        assert local.host is not None
        assert local.host.loads <= 3, f"{local.host.loads} loads for 16 alternating requests"


@pytest.mark.parametrize(("hold", "loads"), [(5.0, 2), (0.0, 3)])
async def test_a_busy_model_keeps_taking_requests_for_the_swap_hold_before_it_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: float, loads: int
) -> None:
    # a is busy (a long request) when b is asked for; a second request for a comes next.
    # With a hold it joins a's running batch (a, b: two loads); without, a drains at once
    # and the second request waits for a to come back after b (a, b, a: three loads).
    args = ["-np", "4", "--token-delay", "0.05", "--tokens", "20"]
    models = {"a": {"args": args}, "b": {"args": args}}
    async with serving(tmp_path, monkeypatch, models, max_instances=1, swap_hold=hold) as (
        local,
        base,
        http,
    ):
        assert (await complete(http, base, "a", max_tokens=1))[0] == 200
        assert local.host is not None
        long_a = asyncio.create_task(complete(http, base, "a", max_tokens=20))  # ~1 s
        await wait_for(lambda: local.host is not None and local.host.loading is None, "a idle")
        pool = local.balancer.scheduler.fleet.pool
        await wait_for(lambda: any(i.in_flight for i in pool("a")), "long_a in flight")
        wants_b = asyncio.create_task(complete(http, base, "b", max_tokens=1))
        await wait_for(lambda: local.host is not None and local.host.loading == "b", "b queued")
        second_a = await complete(http, base, "a", max_tokens=1)
        assert second_a[0] == 200
        assert (await long_a)[0] == 200
        assert (await wants_b)[0] == 200
        assert local.host.loads == loads


async def test_max_instances_evicts_the_least_recently_used_idle_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {}, "b": {}, "c": {}}
    async with serving(tmp_path, monkeypatch, models, max_instances=2) as (local, base, http):
        for model in ("a", "b", "a"):
            assert (await complete(http, base, model))[0] == 200
        assert await settled(local) == {"a": "loaded", "b": "loaded"}
        assert (await complete(http, base, "c"))[0] == 200  # b is least recently used
        assert await settled(local) == {"a": "loaded", "c": "loaded"}


async def test_groups_exclusive_swap_shared_coexist_persistent_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {
        "x": {"group": "swap"},
        "y": {"group": "swap"},
        "p": {"group": "keep"},
        "q": {"group": "keep"},
        "z": {},
    }
    groups = {"swap": {"exclusive": True}, "keep": {"exclusive": False, "persistent": True}}
    async with serving(tmp_path, monkeypatch, models, max_instances=3, groups=groups) as (
        local,
        base,
        http,
    ):
        for model in ("p", "q", "x"):
            assert (await complete(http, base, model))[0] == 200
        assert await settled(local) == {"p": "loaded", "q": "loaded", "x": "loaded"}  # shared
        assert (await complete(http, base, "y"))[0] == 200  # swaps with x, room or not
        assert await settled(local) == {"p": "loaded", "q": "loaded", "y": "loaded"}
        assert (await complete(http, base, "z"))[0] == 200  # p, q persistent: y goes
        assert await settled(local) == {"p": "loaded", "q": "loaded", "z": "loaded"}


async def test_max_instances_of_persistent_models_refuses_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"p": {"group": "keep"}, "z": {}}
    groups = {"keep": {"persistent": True}}
    async with serving(tmp_path, monkeypatch, models, max_instances=1, groups=groups) as (
        local,
        base,
        http,
    ):
        assert (await complete(http, base, "p"))[0] == 200
        status, body = await complete(http, base, "z")
        assert status == 503
        assert "max_instances" in body["error"]["message"]
        assert await settled(local) == {"p": "loaded"}


async def test_idle_ttl_unloads_only_after_the_last_request_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"ttl": 1, "args": ["--token-delay", "0.1", "--tokens", "25"]}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        started = time.monotonic()
        status, body = await stream_through(http, base, "a")  # 2.5 s: longer than the TTL
        ended = time.monotonic()
        assert status == 200 and "[DONE]" in body
        assert ended - started > 2.0 and running(local) == {"a": "loaded"}
        await wait_for(lambda: running(local) == {}, "the idle model to be unloaded")
        assert time.monotonic() - ended >= 0.9


async def test_unload_drains_in_flight_requests_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"args": ["--token-delay", "0.1", "--tokens", "10"]}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        began = asyncio.Event()
        stream = asyncio.create_task(stream_through(http, base, "a", began.set))
        await began.wait()
        management = f"http://{local.balancer.addresses.management}"
        async with http.post(management + "/api/v1/models/a/unload", headers=AUTH) as response:
            assert response.status == 200, await response.text()
        assert stream.done()  # unload answered only after the stream ended
        status, body = stream.result()
        assert status == 200 and "[DONE]" in body and "error" not in body
        assert running(local) == {}


async def test_v1_models_lists_every_model_with_its_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"aliases": ["alpha"]}, "b": {}, "hidden": {"unlisted": True}}
    async with serving(tmp_path, monkeypatch, models) as (_local, base, http):
        assert (await complete(http, base, "alpha"))[0] == 200  # by alias
        async with http.get(base + "/v1/models") as response:
            listed = {m["id"]: m for m in (await response.json())["data"]}
        assert set(listed) == {"a", "b"}
        assert listed["a"]["status"]["value"] == "loaded"
        assert listed["a"]["aliases"] == ["alpha"]
        assert listed["b"]["status"]["value"] == "unloaded"
        assert (await complete(http, base, "hidden"))[0] == 200  # unlisted, still served
        status, body = await complete(http, base, "nope")
        assert status == 404
        assert "a, b" in body["error"]["message"]


async def test_load_and_unload_through_the_management_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {}}) as (local, _base, http):
        management = f"http://{local.balancer.addresses.management}"
        async with http.post(management + "/api/v1/models/a/load") as response:
            assert response.status == 401  # the token is required
        async with http.post(management + "/api/v1/models/a/load", headers=AUTH) as response:
            assert response.status == 200 and (await response.json())["state"] == "loaded"
        async with http.get(management + "/api/v1/models", headers=AUTH) as response:
            (row,) = (await response.json())["models"]
            assert row["id"] == "a" and row["state"] == "loaded"
        async with http.post(management + "/api/v1/models/nope/load", headers=AUTH) as response:
            assert response.status == 404
        async with http.post(management + "/api/v1/models/a/unload", headers=AUTH) as response:
            assert response.status == 200
        assert running(local) == {}


async def test_reload_restarts_only_the_models_whose_settings_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {}, "b": {}}) as (local, base, http):
        for model in ("a", "b"):
            assert (await complete(http, base, model))[0] == 200
        pid_a, pid_b = pid_of(local, "a"), pid_of(local, "b")
        assert local.config_file is not None
        config = yaml.safe_load(local.config_file.read_text())
        config["models"]["b"]["args"] = ["-np", "3"]
        config["models"]["c"] = {"path": config["models"]["a"]["path"]}
        local.config_file.write_text(yaml.safe_dump(config))
        management = f"http://{local.balancer.addresses.management}"
        async with http.post(management + "/api/v1/config/reload", headers=AUTH) as response:
            result = await response.json()
            assert response.status == 200, result
        assert result["changed"] == ["b", "c"] and result["unloaded"] == ["b"]
        assert pid_of(local, "a") == pid_a and "b" not in running(local)
        assert (await complete(http, base, "b"))[0] == 200
        assert pid_of(local, "b") != pid_b
        instances = local.balancer.scheduler.fleet.pool("b")
        assert [i.total_slots for i in instances] == [3]  # the new args took effect
        assert (await complete(http, base, "c"))[0] == 200  # added by the reload

        config["models"]["a"]["group"] = "missing"
        local.config_file.write_text(yaml.safe_dump(config))
        async with http.post(management + "/api/v1/config/reload", headers=AUTH) as response:
            assert response.status == 400
            assert "unknown group" in (await response.json())["error"]["message"]
        assert pid_of(local, "a") == pid_a  # a bad file changes nothing


async def test_reload_keeps_the_model_given_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path))
    for name in ("a", "extra"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    config = tmp_path / "corral.yaml"
    table = {"a": {"path": str(tmp_path / "a.gguf")}}
    addrs = {"inference_addr": "127.0.0.1:0", "management_addr": "127.0.0.1:0"}
    config.write_text(yaml.safe_dump({**addrs, "models": table}))
    local = LocalServe(
        load_settings(config, environ={}),
        ServeOptions(
            binary=fake_binary(tmp_path),
            management_token=TOKEN,
            cluster_token="cluster",
            model=tmp_path / "extra.gguf",  # corral serve --model extra.gguf --config ...
        ),
    )
    local.config_file = config
    await local.start()
    try:
        assert sorted(local.models) == ["a", "extra"]
        table["a"]["args"] = ["-np", "2"]
        config.write_text(yaml.safe_dump({**addrs, "models": table}))
        result = await local.reload()
        assert result["changed"] == ["a"]
        assert sorted(result["models"]) == ["a", "extra"]
    finally:
        await local.stop()


async def test_a_model_that_cannot_start_fails_its_waiting_requests_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"bad": {"args": ["--parallel", "many"]}}
    async with serving(
        tmp_path, monkeypatch, models, restart_max_failures=1, buffered_request_timeout=30
    ) as (local, base, http):
        status, body = await complete(http, base, "bad")
        assert status == 503
        message = body["error"]["message"]
        assert "failed to start" in message and "exited with code" in message
        assert "last log lines:" not in message  # the short reason; the log is kept
        management = f"http://{local.balancer.addresses.management}"
        async with http.get(management + "/api/v1/models", headers=AUTH) as response:
            rows = await response.json()
        (row,) = [r for r in _rows(rows) if r["id"] == "bad"]
        assert "many" in row["error"]  # the server's own complaint, for the operator


def _rows(listing: Any) -> list[dict[str, Any]]:
    return listing["models"] if isinstance(listing, dict) else listing


def test_settings_reject_an_unknown_group(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("groups:\n  swap: {}\nmodels:\n  a: {path: /x.gguf, group: swpa}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert str(caught.value).splitlines()[-1] == (
        f"{config}:4: models.a.group: unknown group 'swpa' (groups: swap) (did you mean 'swap'?)"
    )


async def test_per_request_flags_key_their_own_instance_and_bad_ones_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {}}, max_instances=2) as (local, base, http):
        url = base + "/v1/chat/completions"
        assert (await complete(http, base, "a"))[0] == 200
        for spelled in ("-np 3 --temp 0.50", "--temp=.5 --parallel 3"):
            async with http.post(url, json=chat("a"), headers={"X-Corral-Flags": spelled}) as r:
                assert r.status == 200, await r.text()
        keys = set(await settled(local))
        assert len(keys) == 2 and "a" in keys  # plain a, and one shared flagged instance
        (flagged,) = keys - {"a"}
        assert local.host is not None
        assert local.host.running[flagged].flags == ("--parallel", "3", "--temp", "0.5")
        status, body = await complete(http, base, "nope")
        assert status == 404
        assert "models: a" in body["error"]["message"]
        assert flagged not in body["error"]["message"]  # a pool name no client chose
        pool = local.balancer.scheduler.fleet.pool(flagged)
        assert [i.total_slots for i in pool] == [3]
        headers = {"X-Agent-Flags": "-c 4096 --slot-save-path /tmp"}
        async with http.post(url, json=chat("a"), headers=headers) as r:
            assert r.status == 400
            message = (await r.json())["error"]["message"]
            assert "--slot-save-path is not allowed" in message
        async with http.get(base + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["a"]  # variants unlisted
        # a third instance (other flags) must fit max_instances=2: the LRU one goes
        async with http.post(url, json=chat("a"), headers={"X-Corral-Flags": "-c 1024"}) as r:
            assert r.status == 200
        assert len(await settled(local)) == 2 and "a" not in running(local)


async def test_memory_admission_evicts_to_fit_or_refuses_with_both_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mib = 1024 * 1024
    async with serving(tmp_path, monkeypatch, {"a": {}, "b": {}}) as (local, base, http):
        assert local.host is not None
        assert (await complete(http, base, "a"))[0] == 200
        host = local.host
        need = host.running["a"].estimate  # the same for b: same (empty) file

        def machine(total: int) -> Callable[[], int]:
            """A machine with ``total`` bytes, less what the running servers take."""
            return lambda: total - sum(h.estimate for h in host.running.values())

        host.memory = machine(2 * need - 50 * mib)  # b fits only once a is gone
        assert (await complete(http, base, "b"))[0] == 200
        assert await settled(local) == {"b": "loaded"}
        host.memory = machine(need - 10 * mib)  # too small even with nothing running
        status, body = await complete(http, base, "a")
        assert status == 503
        message = body["error"]["message"]
        assert f"needs about {need / mib:.1f} MiB" in message
        assert f"{(need - 10 * mib) / mib:.1f} MiB is available" in message
        assert await settled(local) == {"b": "loaded"}  # refused without evicting b


async def test_unload_while_a_model_is_still_loading_stops_it_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = {"a": {"args": ["--load-delay", "1.0"]}}
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        assert local.host is not None
        management = f"http://{local.balancer.addresses.management}"
        async with http.post(management + "/api/v1/models/a/load?wait=0", headers=AUTH) as response:
            assert response.status == 202
        await wait_for(lambda: running(local) == {"a": "loading"}, "a to begin loading")
        async with http.post(management + "/api/v1/models/a/unload", headers=AUTH) as response:
            assert response.status == 200
        assert running(local) == {}
        host = local.host
        await wait_for(lambda: host.loading is None, "the interrupted load to end")
        assert host.last_error == {}  # an unload is not a failed start
        assert (await complete(http, base, "a"))[0] == 200  # and it loads again on demand
        assert local.host.loads == 2


async def test_a_bare_balancer_answers_model_actions_with_501(tmp_path: Path) -> None:
    from corral.balancer import Balancer

    settings = Settings(inference_addr="127.0.0.1:0", management_addr="127.0.0.1:0")
    balancer = Balancer(settings, management_token=TOKEN, cluster_token="cluster")
    addresses = await balancer.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://{addresses.management}/api/v1/models/a/load"
            async with http.post(url, headers=AUTH) as response:
                assert response.status == 501
                error = (await response.json())["error"]
                assert error["code"] == 501 and "corral serve" in error["message"]
    finally:
        await balancer.stop()


async def test_per_request_flags_out_of_range_are_a_400_and_start_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {}}) as (local, base, http):
        url = base + "/v1/chat/completions"
        assert local.host is not None
        for flags, named in (
            ("-np 512", "-np"),
            ("-c -5", "-c"),
            ("-c 99999999999999999999999", "-c"),
            ("--top-p 7", "--top-p"),
        ):
            async with http.post(url, json=chat("a"), headers={"X-Corral-Flags": flags}) as r:
                body = await r.json()
            assert r.status == 400, (flags, body)
            assert f"flag {named}:" in body["error"]["message"]
            assert "allowed:" in body["error"]["message"]
        # within the syntax, but more memory than the machine has in all: also a 400
        local.host.total_memory = lambda: 1024
        async with http.post(url, json=chat("a"), headers={"X-Corral-Flags": "-c 8192"}) as r:
            body = await r.json()
        assert r.status == 400, body
        assert "more than this host's" in body["error"]["message"]
        assert local.host.loads == 0
        async with http.post(url, json=chat("a"), headers={"X-Corral-Flags": "-c 2048"}) as r:
            assert r.status == 400  # 1 KiB still holds no model: nothing started
        assert local.host.loads == 0


async def test_flags_that_fail_to_start_are_refused_at_once_and_hold_up_no_other_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = {}
    for model_id in ("a", "b"):
        path = tmp_path / f"{model_id}.gguf"
        path.write_bytes(b"GGUF")
        table[model_id] = {"path": str(path)}
    binary = fake_binary(tmp_path, "--kv-limit", "8192")  # -c above 8192 cannot start
    async with serving_table(tmp_path, monkeypatch, table, binary, buffered_request_timeout=30) as (
        local,
        base,
        http,
    ):
        assert local.host is not None
        url = base + "/v1/chat/completions"
        headers = {"X-Corral-Flags": "-c 65536"}
        async with http.post(url, json=chat("a"), headers=headers) as r:
            body = await r.json()
        assert r.status == 400, body
        message = body["error"]["message"]
        assert "failed to start" in message
        assert "0x" not in message and "last log lines:" not in message
        launches = local.host.loads
        assert launches == 1  # tried once (start_attempts launches), then given up
        # the same flags again: refused at once with the reason, nothing started
        async with http.post(
            url, json=chat("a"), headers={"X-Corral-Flags": "--ctx-size 65536"}
        ) as r:
            again = await r.json()
        assert r.status == 400
        assert "failed within the last" in again["error"]["message"]
        assert local.host.loads == launches
        # another model loads and serves meanwhile
        assert (await complete(http, base, "b"))[0] == 200


async def test_filters_and_use_model_name_change_the_body_that_goes_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = {
        "filters": {
            "strip_params": ["top_k"],
            "set_params": {"temperature": 0.25},
            "set_params_by_name": {"m:hot": {"temperature": 1.5}},
        },
        "use_model_name": "org/served-name",
    }
    async with serving(tmp_path, monkeypatch, {"m": entry}) as (local, base, http):

        async def settings(name: str) -> dict[str, Any]:
            body = {"model": name, "prompt": "hi", "temperature": 0.9, "top_k": 5}
            async with http.post(base + "/completion", json=body) as response:
                assert response.status == 200, await response.text()
                data: dict[str, Any] = (await response.json())["generation_settings"]
                return data

        plain = await settings("m")
        assert plain["temperature"] == 0.25 and plain["top_k"] == 40  # set; stripped
        assert (await settings("m:hot"))["temperature"] == 1.5  # a name that is an alias
        async with http.post(base + "/v1/embeddings", json={"model": "m", "input": "x"}) as r:
            assert r.status == 200
        assert local.host is not None
        async with http.get(local.host.running["m"].url + "/_fake/state") as r:
            assert (await r.json())["last_model"] == "org/served-name"  # what it was sent
        async with http.post(
            base + "/tokenize", json={"model": "m", "content": "hi there"}
        ) as response:
            assert response.status == 200  # a body without those keys is fine too


async def test_a_slow_start_does_not_hold_up_another_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One model's server that takes long to come up (or hangs until startup_timeout)
    must not make requests for other models wait behind it."""
    models = {"slow": {"args": ["--load-delay", "30"]}, "quick": {}}
    async with serving(tmp_path, monkeypatch, models, buffered_request_timeout=60) as (
        local,
        base,
        http,
    ):
        slow = asyncio.create_task(complete(http, base, "slow"))
        await wait_for(lambda: running(local).get("slow") == "loading", "slow to be starting")
        status, body = await complete(http, base, "quick")
        assert status == 200, body
        assert not slow.done() and running(local)["slow"] == "loading"
        slow.cancel()
