"""Router mode's routes for llama-server's web UI, on ``corral serve`` with two models.

The same real :class:`~corral.serve.LocalServe` over fake llama-servers as
``test_models.py``; the browser test in the real tier drives the UI itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.events import collect
from tests.support.events import events as sse_events
from tests.support.local_serve import complete, running, serving, settled

TWO = {"alpha": {}, "beta": {}}


async def test_props_without_a_model_answers_like_router_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        async with http.get(base + "/props?autoload=false") as response:
            assert response.status == 200
            props = await response.json()
        assert props["role"] == "router"
        assert props["max_instances"] == 4
        assert props["default_generation_settings"] == {"params": None, "n_ctx": 0}
        assert running(local) == {}  # answering it started nothing


async def test_props_of_a_model_comes_from_its_instance_started_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        async with http.get(base + "/props", params={"model": "beta"}) as response:
            assert response.status == 200
            props = await response.json()
        assert "role" not in props or props["role"] != "router"
        assert props["default_generation_settings"]["n_ctx"] > 0
        assert response.headers["X-Corral-Instance"]
        assert await settled(local) == {"beta": "loaded"}


async def test_props_with_autoload_false_is_400_until_the_model_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        query = {"model": "alpha", "autoload": "false"}
        async with http.get(base + "/props", params=query) as response:
            assert response.status == 400
            assert "not loaded" in (await response.json())["error"]["message"]
        assert running(local) == {}
        assert (await complete(http, base, "alpha"))[0] == 200
        async with http.get(base + "/props", params=query) as response:
            assert response.status == 200
        async with http.get(base + "/props", params={"model": "nope"}) as response:
            assert response.status == 404


async def test_load_and_model_events_report_loading_then_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        async with http.get(base + "/models/sse") as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(response)
            snapshot = await collect(events, lambda r: len(r) >= 2)
            assert {(r["model"], r["event"], r["data"]["status"]) for r in snapshot} == {
                ("alpha", "model_status", "unloaded"),
                ("beta", "model_status", "unloaded"),
            }
            async with http.post(base + "/models/load", json={"model": "beta"}) as response:
                assert response.status == 200
                assert await response.json() == {"success": True}
            changes = await collect(
                events, lambda r: any(e["data"]["status"] == "loaded" for e in r)
            )
        assert [(r["model"], r["data"]["status"]) for r in changes] == [
            ("beta", "loading"),
            ("beta", "loaded"),
        ]
        assert {r["event"] for r in changes} == {"status_change"}
        assert running(local) == {"beta": "loaded"}


async def test_load_refuses_bad_bodies_and_unknown_models_and_unload_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        for body in (b"{not json", b"[1]", b'{"model": 3}', b'{"model": ""}'):
            async with http.post(base + "/models/load", data=body) as response:
                assert response.status == 400, body
        async with http.post(base + "/models/load", json={"model": "../etc/passwd"}) as response:
            assert response.status == 404
        assert running(local) == {}
        assert (await complete(http, base, "alpha"))[0] == 200
        async with http.post(base + "/models/unload", json={"model": "alpha"}) as response:
            assert response.status == 403
            assert "management API" in (await response.json())["error"]["message"]
        assert await settled(local) == {"alpha": "loaded"}


async def test_webui_routes_require_the_api_key_when_one_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO, api_keys=["secret-key"]) as (_, base, http):
        for method, path in (
            ("GET", "/props"),
            ("GET", "/props?model=alpha&autoload=false"),
            ("GET", "/models/sse"),
            ("POST", "/models/load"),
            ("POST", "/models/unload"),
            ("POST", "/v1/streams/lookup"),
        ):
            async with http.request(method, base + path, json={"model": "alpha"}) as response:
                assert response.status == 401, path
        key = {"Authorization": "Bearer secret-key"}
        async with http.get(base + "/props", headers=key) as response:
            assert (await response.json())["role"] == "router"


async def test_pages_that_name_no_model_go_to_a_ready_instance_or_start_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        async with http.get(base + "/build.json") as response:
            assert "X-Corral-Instance" in response.headers  # an instance answered it
        assert await settled(local) == {"alpha": "loaded"}  # the first listed model
        async with http.post(base + "/models/load", json={"model": "beta"}) as response:
            assert response.status == 200
        await settled(local)
        async with http.get(base + "/favicon.svg") as response:
            instance = response.headers["X-Corral-Instance"]
        assert instance in {i.id for i in local.balancer.scheduler.fleet.instances.values()}
        # a model route that names no model still has to name one
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        async with http.post(base + "/v1/chat/completions", json=chat) as response:
            assert response.status == 400
            assert "several models" in (await response.json())["error"]["message"]


async def test_stream_lookup_finds_nothing_resumable_with_several_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, TWO) as (local, base, http):
        body = {"conversation_ids": ["c1::alpha"]}
        async with http.post(base + "/v1/streams/lookup", json=body) as response:
            assert response.status == 200
            assert await response.json() == []
        assert running(local) == {}


async def test_one_model_keeps_model_mode_props(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tmp_path, monkeypatch, {"solo": {}}) as (_, base, http):
        async with http.get(base + "/props") as response:
            assert response.status == 200
            props = await response.json()
        assert props.get("role") != "router"
        assert props["default_generation_settings"]["n_ctx"] > 0


# -- the built web UI beside llama-server ------------------------------------------------


def built_ui(folder: Path, title: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(f"<!doctype html><title>{title}</title>")
    return folder


async def test_serve_gives_llama_server_the_web_ui_built_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLAMA_ARG_STATIC_PATH", raising=False)
    ui = built_ui(tmp_path / "ui", "built UI")  # beside the fake binary, tmp_path/llama-server
    async with serving(tmp_path, monkeypatch, {"alpha": {}}) as (local, base, http):
        async with http.get(base + "/") as response:
            assert response.status == 200
            assert "<title>built UI</title>" in await response.text()
        assert local.host is not None
        args = local.host.running["alpha"].managed.supervisor.args
        assert args[args.index("--path") + 1] == str(ui)


async def test_serve_leaves_the_static_path_alone_when_the_user_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLAMA_ARG_STATIC_PATH", raising=False)
    built_ui(tmp_path / "ui", "built UI")
    mine = built_ui(tmp_path / "mine", "my UI")
    models = {
        "by-flag": {"args": ["--path", str(mine)]},
        "by-env": {"env": {"LLAMA_ARG_STATIC_PATH": str(mine)}},
        "off": {"args": ["--no-webui"]},
    }
    async with serving(tmp_path, monkeypatch, models) as (local, base, http):
        for model in ("by-flag", "by-env"):
            async with http.get(base + "/", headers={"X-Model-Id": model}) as response:
                assert response.status == 200
                assert "<title>my UI</title>" in await response.text()
        async with http.get(base + "/", headers={"X-Model-Id": "off"}) as response:
            assert response.status == 404
        assert local.host is not None
        for model in models:
            args = local.host.running[model].managed.supervisor.args
            assert args.count("--path") == (1 if model == "by-flag" else 0), (model, args)
