"""The OpenAPI document's generator, without a server: valid OpenAPI 3.1, every route
the apps register described (and only those), the committed docs/openapi.json current,
the typed models true to the dict views they describe, and the query parser's
refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openapi_spec_validator import validate

from corral.control import api_schema as api
from corral.control.dashboard import ASSETS, is_public
from corral.control.management import Management
from corral.control.openapi import OPERATIONS, build_openapi, openapi_text
from corral.control.probes import PROBE_PATHS
from corral.fleet.state import Agent, Instance, InstanceIssue, InstanceState
from corral.gateway.listing import ListingRoutes
from corral.gateway.options import GatewayOptions
from corral.gateway.proxy import Gateway
from corral.observe.autoscaling import model_demand
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.protocol import SupervisorReport
from corral.scheduling.policies.least_busy import LeastBusy
from corral.scheduling.scheduler import Scheduler

DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_docs_openapi_json_is_what_the_code_generates() -> None:
    assert DOCS.read_text(encoding="utf-8") == openapi_text(), (
        "docs/openapi.json is out of date with the code: regenerate it with "
        "`corral openapi --output docs/openapi.json` and commit the result"
    )


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_openapi()
    assert document["openapi"].startswith("3.1.")
    validate(document)


def test_every_ref_points_at_a_schema_of_the_document() -> None:
    document = build_openapi()
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    schemas = {f"#/components/schemas/{name}" for name in document["components"]["schemas"]}
    assert refs and refs <= schemas
    assert len({op.operation_id for op in OPERATIONS}) == len(OPERATIONS)


def _management_routes() -> set[tuple[str, str]]:
    scheduler = Scheduler(LeastBusy())
    management = Management(
        scheduler, BalancerMetrics(scheduler), management_token="m", cluster_token="c"
    )
    routes = set()
    for route in management.app.router.routes():
        if route.method != "HEAD":  # aiohttp adds it beside every GET
            info = route.resource.get_info() if route.resource is not None else {}
            routes.add((route.method, str(info.get("path") or info.get("formatter"))))
    return routes


def _listing_routes() -> set[tuple[str, str]]:
    scheduler = Scheduler(LeastBusy())
    gateway = Gateway(
        scheduler,
        BalancerMetrics(scheduler),
        GatewayOptions(api_keys=[], max_body=1 << 20, expose_slots=True),
    )
    routes = set()
    for route in gateway.app.router.routes():
        handler = getattr(route.handler, "__self__", None)
        if isinstance(handler, ListingRoutes) and route.method != "HEAD":
            assert route.resource is not None
            routes.add((route.method, route.resource.canonical))
    return routes


def test_every_route_the_apps_register_is_described_and_no_other() -> None:
    described = {(op.method, op.path) for op in OPERATIONS if op.listener == "management"}
    registered = _management_routes()
    registered.remove(("GET", "/dashboard/{name}"))  # one route, described file by file
    registered |= {("GET", f"/dashboard/{name}") for name in ASSETS}
    assert described == registered
    front_door = {(op.method, op.path) for op in OPERATIONS if op.listener == "inference"}
    assert front_door == _listing_routes()


def test_routes_without_a_token_are_exactly_the_ones_the_middleware_lets_through() -> None:
    for operation in OPERATIONS:
        if operation.listener == "management":
            public = is_public(operation.path) or operation.path in PROBE_PATHS
            assert (operation.security == "public") == public, operation.path
    document = build_openapi()
    for path, item in document["paths"].items():
        for method, described in item.items():
            if method == "servers":
                continue
            if described.get("security") == []:
                assert "401" not in described["responses"], path
            else:
                assert "401" in described["responses"], path


def test_the_cli_prints_the_document_and_writes_it_to_a_file(tmp_path: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "corral.cli", "openapi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert printed.stdout == openapi_text()
    output = tmp_path / "openapi.json"
    written = subprocess.run(
        [sys.executable, "-m", "corral.cli", "openapi", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert written.stdout == "" and str(output) in written.stderr
    assert json.loads(output.read_text()) == build_openapi()


# -- the models against the dict views they describe -----------------------------------


def _strict(model: type[api.BaseModel], value: object) -> None:
    """Validate as a client would read it: the JSON on the wire, exactly typed."""
    model.model_validate_json(json.dumps(value), strict=True)


def test_instance_and_agent_views_match_their_models_with_and_without_a_supervisor() -> None:
    watched = Instance(id="a/0", agent_id="a", url="http://127.0.0.1:1", model="m")
    watched.issues.append(InstanceIssue("unreachable", "refused"))
    supervised = Instance(
        id="a/1",
        agent_id="a",
        url="http://127.0.0.1:2",
        model="m",
        aliases=["alias"],
        state=InstanceState.READY,
        total_slots=4,
        supervisor=SupervisorReport(
            state="ready", pid=7, launches=1, readies=1, startup_seconds=(0.5,), log_tail=("x",)
        ),
    )
    for instance in (watched, supervised):
        _strict(api.InstanceView, instance.as_dict())
    assert "supervisor" not in api.InstanceView.model_validate(watched.as_dict()).model_dump(
        exclude_unset=True
    )
    _strict(api.AgentView, Agent(id="a", name="host", instance_ids={"a/0", "a/1"}).as_dict())
    with pytest.raises(ValueError, match="extra"):
        api.InstanceView.model_validate({**supervised.as_dict(), "new_key": 1})


def test_demand_and_traffic_views_match_their_models() -> None:
    scheduler = Scheduler(LeastBusy())
    _strict(api.ModelDemandView, model_demand(scheduler, "m").as_dict())
    now = [1000.0]
    traffic = RecentTraffic(clock=lambda: now[0], seed=1)
    _strict(api.TrafficView, traffic.summary())
    traffic.record("m", 200, 0.5, ttft=0.1)
    traffic.record("m", 503, 0.2)
    now[0] += 15
    summary = traffic.summary()
    assert summary["models"]["m"]["errors"] == 1
    _strict(api.TrafficView, summary)


# -- query parameters --------------------------------------------------------------------


def _request(query: str) -> web.Request:
    return make_mocked_request("GET", "/x?" + query)


def test_query_parameters_take_defaults_and_parse_strings() -> None:
    assert api.parse_query(api.AutoscalingQuery, _request("")).target == 0.8
    query = api.parse_query(api.AutoscalingQuery, _request("target=0.5&model=m&other=1"))
    assert (query.target, query.model) == (0.5, "m")
    logs = api.parse_query(api.LogsQuery, _request("lines=0&follow=true"))
    assert (logs.lines, logs.follow) == (0, True)
    assert api.parse_query(api.LoadQuery, _request("wait=0")).wait is False


@pytest.mark.parametrize(
    ("model", "query", "named"),
    [
        (api.AutoscalingQuery, "target=0", "`target`: input should be greater than 0, not '0'"),
        (api.AutoscalingQuery, "target=lots", "`target`"),
        (api.AutoscalingQuery, "target=nan", "`target`"),
        (api.DrainQuery, "drain_timeout=-1", "`drain_timeout`"),
        (api.DrainQuery, "drain_timeout=inf", "`drain_timeout`"),
        (api.LogsQuery, "lines=-1", "`lines`"),
        (api.LogsQuery, "follow=maybe", "`follow`"),
        (api.LoadQuery, "wait=soon", "`wait`"),
        (api.AutoscalingQuery, "model=a&model=b", "give the query parameter `model` once"),
    ],
)
def test_malformed_query_parameters_are_refused_by_name(
    model: type[api.Query], query: str, named: str
) -> None:
    with pytest.raises(api.BadInput) as refused:
        api.parse_query(model, _request(query))
    assert named in str(refused.value)


def test_a_reconfigure_body_is_described_as_the_handler_takes_it() -> None:
    schema = api.ReconfigureRequest.model_json_schema()
    assert schema["additionalProperties"] is False and schema["minProperties"] == 1
    assert schema["properties"]["port"] == {
        "description": "The loopback port it listens on from now on.",
        "maximum": 65535,
        "minimum": 1,
        "title": "Port",
        "type": "integer",
    }
    with pytest.raises(ValueError):
        api.ReconfigureRequest.model_validate({"args": ["--parallel", "4\x00"]})
