"""The OpenAPI description against a running ``corral serve`` (the fake llama-server as
its binary, API keys set, ``expose_slots`` on, a config file to reload).

The served document is the generated one; every route behind a token refuses a
request without it; every route's real answers validate against the models the
document is made of; and schemathesis fuzzes the management API and the front door's
own routes from the served document: no 5xx, every answer as described.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import schemathesis
from pydantic import BaseModel

from corral.control import api_schema as api
from corral.control.openapi import OPENAPI_PATH, OPERATIONS, Operation, build_openapi
from tests.support.events import events
from tests.support.serve_fake import fake_binary
from tests.support.serve_process import ServeProcess, healthy, start_serve
from tests.support.waiting import wait_for, wait_until

TOKEN = "openapi-token"
API_KEY = "openapi-key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYED = {"Authorization": f"Bearer {API_KEY}"}

#: Fuzzing budget per operation: small enough for 2 slow cores, deterministic.
MAX_EXAMPLES = 50
SEED = 23


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("openapi")
    model = tmp / "tiny.gguf"
    model.write_bytes(b"GGUF")  # the fake never reads it
    config = tmp / "corral.yaml"
    # the model in the config file too: a reload re-reads that file's models table, and
    # a fuzzer reloads it many times
    entry = {"path": str(model), "preload": True}
    config.write_text(json.dumps({"expose_slots": True, "models": {"tiny": entry}}))
    serve = start_serve(
        tmp,
        fake_binary(tmp),
        model,
        TOKEN,
        serve_args=["--config", str(config)],
        env={"CORRAL_API_KEYS": API_KEY},
    )
    try:
        wait_until(
            lambda: healthy(serve.base),
            "corral serve to be ready",
            watch=[(serve.process, serve.log_path)],
        )
        yield serve
    finally:
        serve.stop()


# -- the document ---------------------------------------------------------------------------


def _url(serve: ServeProcess, operation: Operation, **params: str) -> str:
    base = serve.base if operation.listener == "inference" else serve.management
    return base + re.sub(r"\{(\w+)\}", lambda m: params.get(m[1], "nobody"), operation.path)


async def test_served_document_is_the_generated_one_and_needs_the_token(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(serving.management + OPENAPI_PATH, headers=AUTH) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == build_openapi()
    async with http.get(serving.management + OPENAPI_PATH) as response:
        assert response.status == 401


async def test_every_route_behind_a_token_refuses_a_request_without_one(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    protected = [op for op in OPERATIONS if op.security != "public"]
    assert {op.method for op in protected} >= {"GET", "POST"}
    for operation in protected:
        url = _url(serving, operation)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            async with http.request(
                operation.method, url, headers=headers, json={"args": []}
            ) as response:
                what = f"{operation.method} {operation.path} with {headers}"
                assert response.status == 401, what
                assert response.headers["WWW-Authenticate"] == "Bearer", what
                body = api.ErrorResponse.model_validate_json(await response.read(), strict=True)
                assert body.error.type == "authentication_error", what


async def test_public_routes_answer_without_a_token(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    public = [op for op in OPERATIONS if op.security == "public"]
    assert public
    for operation in public:
        async with http.request(operation.method, _url(serving, operation)) as response:
            assert response.status in operation.answers, f"{operation.path}: {response.status}"


# -- real answers against their models ------------------------------------------------------


class Answers:
    """Calls routes and validates each answer against the model its operation names
    for that status (an error's against ErrorResponse); remembers what it checked."""

    def __init__(self, serve: ServeProcess, http: aiohttp.ClientSession) -> None:
        self.serve = serve
        self.http = http
        self.checked: set[tuple[str, str, int]] = set()

    async def call(
        self,
        method: str,
        template: str,
        status: int,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        **params: str,
    ) -> Any:
        (operation,) = [o for o in OPERATIONS if (o.method, o.path) == (method, template)]
        headers = KEYED if operation.security == "api_key" else AUTH
        async with self.http.request(
            method, _url(self.serve, operation, **params), params=query, json=body, headers=headers
        ) as response:
            raw = await response.read()
            assert response.status == status, raw[:500]
            answer = operation.answers.get(status)
            model: type[BaseModel] | None = api.ErrorResponse if answer is None else answer.body
            assert answer is not None or status in operation.errors or status == 401
            self.checked.add((method, template, status))
            if model is None or response.content_type != "application/json":
                assert answer is not None and answer.media is not None
                assert response.content_type == answer.media
                return raw.decode()
            model.model_validate_json(raw, strict=True)  # the wire's JSON, exactly typed
            return json.loads(raw)


async def test_every_route_answers_what_its_model_describes(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    answers = Answers(serving, http)
    call = answers.call
    # the fleet
    (instance,) = (await call("GET", "/api/v1/instances", 200))["instances"]
    assert instance["supervisor"]["state"] == "ready"
    agent, local = instance["id"].split("/")
    assert (await call("GET", "/api/v1/agents", 200))["agents"][0]["id"] == agent
    assert (await call("GET", "/api/v1/fleet", 200))["models"] == ["tiny"]
    await call("GET", "/api/v1/buffer", 200)
    fleet_demand = await call("GET", "/api/v1/autoscaling", 200)
    api.FleetDemandView.model_validate(fleet_demand)
    one = await call("GET", "/api/v1/autoscaling", 200, query={"model": "tiny"})
    assert one["model"] == "tiny" and one["instances"] == 1
    await call("GET", "/api/v1/autoscaling", 400, query={"target": "2"})
    # the front door's own, and traffic for the traffic view
    async with http.post(
        serving.base + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        headers=KEYED,
    ) as response:
        assert response.status == 200
    assert (await call("GET", "/health", 200))["status"] == "ok"
    await call("GET", "/v1/health", 200)
    (listed,) = (await call("GET", "/v1/models", 200))["data"]
    assert listed["id"] == "tiny" and listed["status"]["value"] == "loaded"
    await call("GET", "/models", 200)
    assert len(await call("GET", "/corral/slots", 200)) == 1
    traffic = await call("GET", "/api/v1/traffic", 200)
    assert traffic["models"]["tiny"]["requests"] >= 1
    # probes, metrics, the dashboard, this document
    await call("GET", "/livez", 200)
    await call("GET", "/readyz", 200)
    assert "corral_" in await call("GET", "/metrics", 200)
    for operation in OPERATIONS:
        if operation.tag == "dashboard" and not operation.streams:
            await call("GET", operation.path, 200)
    await call("GET", OPENAPI_PATH, 200)
    # models
    (model,) = (await call("GET", "/api/v1/models", 200))["models"]
    assert model["id"] == "tiny" and model["state"] == "loaded"
    assert model["hosts"] == ["local"] and model["running_on"] == "local"
    (machine,) = (await call("GET", "/api/v1/hosts", 200))["hosts"]
    assert machine["id"] == "local" and machine["models"] == ["tiny"]
    assert [s["key"] for s in machine["servers"]] == ["tiny"]
    await call("POST", "/api/v1/models/rescan", 200)
    assert (await call("POST", "/api/v1/config/reload", 200))["models"] == ["tiny"]
    await call("POST", "/api/v1/models/{model}/load", 404, model="nothing-by-this-name")
    await call("POST", "/api/v1/models/{model}/load", 400, model="tiny", query={"wait": "soon"})
    await call("POST", "/api/v1/models/{model}/unload", 404, model="nothing-by-this-name")
    # instances
    ids = {"agent": agent, "local": local}
    logs = await call("GET", "/api/v1/instances/{agent}/{local}/logs", 200, **ids)
    assert logs["lines"] and logs["cursor"] >= len(logs["lines"])
    await call("GET", "/api/v1/instances/{agent}/{local}/logs", 400, query={"lines": "-1"}, **ids)
    await call("GET", "/api/v1/instances/{agent}/{local}/logs", 404, agent="nobody", local="0")
    reconfigure = "/api/v1/instances/{agent}/{local}/reconfigure"
    await call("POST", reconfigure, 400, body={"args": ["--host", "0.0.0.0"]}, **ids)
    await call("POST", reconfigure, 400, body={"port": "high"}, **ids)
    await call("POST", reconfigure, 404, body={"args": []}, agent="nobody", local="0")
    changed = await call("POST", reconfigure, 202, body={"args": ["--parallel", "2"]}, **ids)
    assert changed["args"] == ["--parallel", "2"] and "port" not in changed
    await wait_for(lambda: _slots(serving) == 2, "the instance back with 2 slots")
    restart = "/api/v1/instances/{agent}/{local}/restart"
    await call("POST", restart, 400, query={"drain_timeout": "-1"}, **ids)
    await call("POST", restart, 404, agent="nobody", local="0")
    assert (await call("POST", restart, 202, **ids))["restarting"] is True
    await wait_for(lambda: healthy(serving.base), "the instance back after its restart")
    rolling = await call("POST", "/api/v1/models/{model}/restart", 200, model="tiny")
    assert [step["ready"] for step in rolling["restarted"]] == [True]
    await call("POST", "/api/v1/models/{model}/restart", 404, model="nothing-by-this-name")
    # unload, load without waiting, load and wait
    unloaded = await call("POST", "/api/v1/models/{model}/unload", 200, model="tiny")
    assert unloaded["state"] == "unloaded"
    await call("GET", "/health", 503)
    loading = await call(
        "POST", "/api/v1/models/{model}/load", 202, model="tiny", query={"wait": "0"}
    )
    assert loading["state"] == "loading"
    assert (await call("POST", "/api/v1/models/{model}/load", 200, model="tiny"))["state"] == (
        "loaded"
    )
    await call("POST", "/api/v1/models/{model}/unload", 404, model="nothing-by-this-name")

    # every operation but the streams was called for at least its first success
    called = {(method, path) for method, path, _ in answers.checked}
    for operation in OPERATIONS:
        if not operation.streams:
            assert (operation.method, operation.path) in called, operation.operation_id


def _slots(serve: ServeProcess) -> int:
    try:
        with urllib.request.urlopen(serve.base + "/health", timeout=2) as response:
            return int(json.loads(response.read())["slots_free"])
    except (urllib.error.URLError, OSError):
        return 0


async def test_streams_send_the_events_their_description_names(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    for operation in OPERATIONS:
        if not operation.streams or operation.tag == "agents":
            continue  # the agents' WebSocket is tested by the agent suites
        (answer,) = operation.answers.values()
        assert answer.events, operation.operation_id
        async with http.get(_url(serving, operation), headers=AUTH) as response:
            assert response.status == 200
            assert response.content_type == answer.media
            stream = events(response)
            wanted = dict(answer.events)
            async with asyncio.timeout(10):  # each named event comes at once
                while wanted:
                    event = await anext(stream)
                    model = wanted.pop(event.kind, None)
                    if model is not None:
                        model.model_validate_json(json.dumps(event.data), strict=True)


async def test_bad_input_to_the_management_api_is_a_clear_openai_shaped_4xx(
    serving: ServeProcess, http: aiohttp.ClientSession
) -> None:
    """What a fuzzer or a hostile client sends, on the real instance: each refusal
    says what was wrong in the one error shape, and nothing restarts."""

    async def refused(method: str, path: str, status: int, **kwargs: Any) -> str:
        async with http.request(
            method, serving.management + path, headers=AUTH, **kwargs
        ) as response:
            raw = await response.read()
            assert response.status == status, raw[:300]
            return api.ErrorResponse.model_validate_json(raw, strict=True).error.message

    async with http.get(serving.management + "/api/v1/instances", headers=AUTH) as response:
        (instance,) = (await response.json())["instances"]
    base = f"/api/v1/instances/{instance['id']}"
    nested = "[" * 100_000  # deeper than Python's JSON decoder goes
    assert "must be JSON" in await refused("POST", base + "/reconfigure", 400, data=nested)
    for timeout in ("nan", "inf", "-1", "soon"):
        message = await refused("POST", base + "/restart", 400, params={"drain_timeout": timeout})
        assert "`drain_timeout`" in message
    assert "once" in await refused(
        "GET", base + "/logs", 400, params=[("lines", "1"), ("lines", "2")]
    )
    too_big = json.dumps({"args": ["x" * (2 << 20)]})
    assert "too large" in await refused("POST", base + "/reconfigure", 413, data=too_big)
    assert "openapi.json" in await refused("GET", "/api/v1/nothing-here", 404)
    allowed = await refused("DELETE", "/api/v1/fleet", 405)
    assert "use GET" in allowed
    async with http.get(serving.management + "/api/v1/instances", headers=AUTH) as response:
        (after,) = (await response.json())["instances"]
    assert after["supervisor"]["launches"] == instance["supervisor"]["launches"]


# -- schemathesis ---------------------------------------------------------------------------


def _fuzzed(listener: str) -> Any:
    """The document for schemathesis: this listener's routes less the streams (an event
    stream or a WebSocket never ends, so a fuzzer's request to one would hang). It is
    the generated document, which the test above proves is the one served; loading it
    at collection gives one test per route."""
    document = build_openapi()
    for path, item in list(document["paths"].items()):
        on = "inference" if "servers" in item else "management"
        for method in [m for m in item if m in ("get", "post")]:
            if item[method].get("x-corral-streams") or on != listener:
                del item[method]
        if not {"get", "post"} & set(item):
            del document["paths"][path]
    no_responses = {"extra-data-sources": {"responses": False}}
    settings: dict[str, Any] = {
        "seed": SEED,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",  # no examples replayed from an earlier run
            # the test sends the token itself; schemathesis leaving it out of a
            # "negative" case would prove nothing (ignored_auth probes without it)
            "with-security-parameters": False,
            # unknown query parameters are ignored, as the document's description says
            "allow-extra-parameters": False,
        },
        # inputs from the data alone, not from earlier answers (ids, times and pids
        # differ from run to run, and a real instance id would let the fuzzer restart it)
        "phases": {
            "examples": no_responses,
            "coverage": no_responses,
            "fuzzing": {**no_responses, "error-feedback": {"enabled": False}},
        },
        "request-timeout": 30,
    }
    if listener == "inference":
        # the front door forwards every other method and path to llama-server, so an
        # undeclared method is llama-server's to answer (405 or 404), not corral's
        settings["checks"] = {"unsupported_method": {"enabled": False}}
    config = schemathesis.Config.from_dict(settings)
    return schemathesis.openapi.from_dict(document, config=config)


management = _fuzzed("management")
front_door = _fuzzed("inference")


@management.parametrize()
def test_management_api_fuzzed_answers_as_described(case: Any, serving: ServeProcess) -> None:
    case.call_and_validate(base_url=serving.management, headers=AUTH)


@front_door.parametrize()
def test_front_door_routes_fuzzed_answer_as_described(case: Any, serving: ServeProcess) -> None:
    case.call_and_validate(base_url=serving.base, headers=KEYED)


def test_fuzzed_routes_are_every_route_but_the_streams() -> None:
    fuzzed = {
        (operation.method.upper(), operation.path)
        for schema in (management, front_door)
        for operation in (result.ok() for result in schema.get_all_operations())
    }
    left_out = {(op.method, op.path) for op in OPERATIONS} - fuzzed
    assert left_out == {(op.method, op.path) for op in OPERATIONS if op.streams}
    assert left_out  # there are streams, and they are described
