"""The OpenAPI 3.1 description of the management API and of the front door's own routes.

The document is built, not written: :data:`OPERATIONS` is the route table (method,
path, what each status means, which query parameters and body it takes, which token
it needs), and the shapes come from the pydantic models of
:mod:`corral.control.api_schema` through pydantic's JSON schema generation, gathered
under ``components/schemas`` and referenced by ``$ref``. A unit test holds the table
to the routes the apps really register, so a route cannot be added undocumented.

It is served at ``GET /api/v1/openapi.json`` (the management token, like every data
route) and kept in the repository as ``docs/openapi.json``; ``corral openapi --output
docs/openapi.json`` writes it again after a change, and a test fails while the two
differ.

The front door's own routes (``/health``, ``/v1/models``, the slots aggregate) are on
the inference listener: their path items name that server. llama-server's routes that
corral forwards (``/v1/chat/completions`` and the rest) are llama-server's to describe.

Two extensions say what OpenAPI 3.1 cannot: ``x-corral-streams: true`` marks the
operations that never end (server-sent events, the agents' WebSocket), which a fuzzer
leaves out, and ``x-corral-events`` gives the shape of each named event of a stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from corral import __version__
from corral.config import Settings
from corral.control import api_schema as api
from corral.control.dashboard import ASSETS
from corral.gateway.listing import SLOTS_AGGREGATE
from corral.protocol import AGENT_SOCKET_PATH

OPENAPI_PATH = "/api/v1/openapi.json"

Security = Literal["management", "cluster", "api_key", "public"]
Listener = Literal["management", "inference"]

#: The security requirement of each kind of route (OpenAPI's ``security``).
SECURITY: dict[Security, list[dict[str, list[str]]]] = {
    "management": [{"managementToken": []}],
    "cluster": [{"clusterToken": []}],
    "api_key": [{"apiKey": []}, {"apiKeyHeader": []}],
    "public": [],
}

#: The refusal every route with a token answers when the token is missing or wrong.
UNAUTHORIZED: dict[Security, str] = {
    "management": "No management token, or a wrong one.",
    "cluster": "No cluster token, or a wrong one (or no verified client certificate, "
    "when `agent_auth` asks for one).",
    "api_key": "No API key, or a wrong one (only when `api_keys` are set).",
}

PATH_PARAMETERS = {
    "agent": "The agent part of an instance id (`AGENT/LOCAL`, see GET /api/v1/instances).",
    "local": "The agent's own part of an instance id.",
    "model": "A model id or alias.",
}

SSE = "text/event-stream"


@dataclass(frozen=True)
class Answer:
    """One documented response: a JSON body of ``body``'s shape, and/or a body of
    media type ``media`` (HTML, Prometheus text, server-sent events)."""

    description: str
    body: type[BaseModel] | None = None
    media: str | None = None
    events: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    """A server-sent event stream's events, by name: the shape of each one's data
    (``x-corral-events``: OpenAPI 3.1 cannot type a stream's items)."""


@dataclass(frozen=True)
class Operation:
    """One route as the document describes it."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    answers: Mapping[int, Answer]
    errors: Mapping[int, str] = field(default_factory=dict)
    """Status -> when; each answers :class:`~corral.control.api_schema.ErrorResponse`
    (401 is added for every route behind a token)."""
    query: type[api.Query] | None = None
    body: type[BaseModel] | None = None
    security: Security = "management"
    listener: Listener = "management"
    streams: bool = False
    """Server-sent events or a WebSocket: described here, not fuzzed (a stream has no end)."""
    description: str = ""


def _camel(name: str) -> str:
    """``app.js`` -> ``AppJs``: a file name as part of an operation id."""
    return "".join(part.capitalize() for part in re.split(r"\W+", name))


def _get(path: str, operation_id: str, summary: str, tag: str, **rest: Any) -> Operation:
    return Operation("GET", path, operation_id, summary, tag, **rest)


def _post(path: str, operation_id: str, summary: str, tag: str, **rest: Any) -> Operation:
    return Operation("POST", path, operation_id, summary, tag, **rest)


INSTANCE = "/api/v1/instances/{agent}/{local}"
NO_HOST = "A balancer without a model host (`corral balancer`): models belong to agents."
NOT_CONNECTED = "The instance's agent is not connected, or could not do it (the message says)."

_HEALTH = {
    200: Answer("At least one instance takes requests.", api.HealthView),
    503: Answer("No instance takes requests now.", api.HealthView),
}
_LISTING = {200: Answer("Every model, loaded or not.", api.ModelListing)}
_PROBE = {
    200: Answer("Passing.", api.ProbePassing),
    503: Answer("Failing, with the reason.", api.ProbeFailing),
}
_STATIC = "The dashboard's static files hold no data: they are served without a token."

#: Every route of the management listener, and the front door's own; see the module doc.
OPERATIONS: tuple[Operation, ...] = (
    # -- probes
    _get("/livez", "getLiveness", "Is the control loop alive?", "probes",
         answers=_PROBE, security="public"),
    _get("/readyz", "getReadiness", "Can this balancer place requests?", "probes",
         answers=_PROBE, security="public",
         description="Ready once both listeners are up and until shutdown begins; no "
         "instance is needed (requests buffer while a model starts)."),
    # -- the fleet
    _get("/api/v1/fleet", "getFleet", "The whole fleet: agents, instances, buffers.", "fleet",
         answers={200: Answer("The fleet now.", api.FleetView)}),
    _get("/api/v1/agents", "listAgents", "The registered agents.", "fleet",
         answers={200: Answer("Every agent.", api.AgentsList)}),
    _get("/api/v1/instances", "listInstances", "Every instance with its slots.", "fleet",
         answers={200: Answer("Every instance.", api.InstancesList)}),
    _get("/api/v1/buffer", "getBuffer", "Requests waiting for a slot or a model.", "fleet",
         answers={200: Answer("The buffer now.", api.BufferView)}),
    _get("/api/v1/autoscaling", "getAutoscaling", "Wanted instances per model.", "fleet",
         answers={200: Answer("Every model's demand, or one model's with `model`.",
                              api.AutoscalingView)},
         errors={400: "A malformed `target` (a share of slots in (0, 1])."},
         query=api.AutoscalingQuery),
    _get("/api/v1/events", "streamEvents", "Fleet changes as server-sent events.", "fleet",
         answers={200: Answer("A `fleet` event first, then one event per change (its "
                              "`type` names it); a comment line every 15 s keeps it open.",
                              media=SSE, events={"fleet": api.FleetView})},
         streams=True),
    # -- instances
    _post(INSTANCE + "/restart", "restartInstance", "Drain an instance, then restart it.",
          "instances",
          answers={202: Answer("Drained (or timed out) and restarting.", api.RestartAnswer)},
          errors={400: "A malformed `drain_timeout`.", 404: "No such instance.",
                  409: NOT_CONNECTED},
          query=api.DrainQuery),
    _post(INSTANCE + "/reconfigure", "reconfigureInstance",
          "Restart an instance with new llama-server arguments or port.", "instances",
          answers={202: Answer("Drained (or timed out) and restarting with the change.",
                               api.ReconfigureAnswer)},
          errors={400: "A malformed body or `drain_timeout`, or a refused argument (the "
                  "message names it).", 404: "No such instance.", 409: NOT_CONNECTED},
          query=api.DrainQuery, body=api.ReconfigureRequest),
    _get(INSTANCE + "/logs", "getInstanceLogs", "An instance's last log lines.", "instances",
         answers={200: Answer("The lines; with `follow`, server-sent events: one JSON "
                              "string per line as it comes.", api.LogsAnswer, media=SSE)},
         errors={400: "A malformed `lines` or `follow`.", 404: "No such instance.",
                 409: NOT_CONNECTED},
         query=api.LogsQuery),
    _post("/api/v1/models/{model}/restart", "restartModel",
          "Rolling restart: one instance at a time, each ready before the next.", "instances",
          answers={200: Answer("Every instance restarted and ready.",
                               api.RollingRestartAnswer)},
          errors={400: "A malformed `drain_timeout` or `ready_timeout`.",
                  404: "No instance serves the model.", 409: NOT_CONNECTED,
                  504: "An instance was not ready in time: the restart stopped there."},
          query=api.RollingRestartQuery),
    # -- models
    _get("/api/v1/models", "listModels", "The model host's catalog, with each model's state.",
         "models", answers={200: Answer("Every catalog model.", api.ModelsList)},
         errors={501: NO_HOST}),
    _post("/api/v1/models/rescan", "rescanModels", "Scan the model folders now.", "models",
          answers={200: Answer("What the scan changed.", api.RescanAnswer)},
          errors={501: NO_HOST}),
    _post("/api/v1/models/{model}/load", "loadModel", "Load a model.", "models",
          answers={200: Answer("Loaded.", api.LoadAnswer),
                   202: Answer("Still loading (or `wait` was false).", api.LoadAnswer)},
          errors={400: "A malformed `wait`.", 404: "No such model.", 501: NO_HOST,
                  503: "The load failed: the message says why."},
          query=api.LoadQuery),
    _post("/api/v1/models/{model}/unload", "unloadModel",
          "Drain every instance of a model, then stop them.", "models",
          answers={200: Answer("Unloaded.", api.UnloadAnswer)},
          errors={404: "No such model.", 501: NO_HOST,
                  409: "Requests were still in flight at `drain_timeout`: it keeps serving."}),
    _get("/api/v1/hosts", "listHosts",
         "The machines models run on: this one and the model hosts, with their room and "
         "servers.", "models",
         answers={200: Answer("Every machine.", api.HostsList)}, errors={501: NO_HOST}),
    _post("/api/v1/config/reload", "reloadConfig", "Re-read the config file.", "models",
          answers={200: Answer("What changed.", api.ReloadAnswer)},
          errors={400: "The file is not valid: nothing changed.",
                  501: NO_HOST + " Or corral was started without a config file."}),
    # -- observability
    _get("/metrics", "getMetrics", "Prometheus metrics.", "observability",
         answers={200: Answer("The Prometheus text format.", media="text/plain")}),
    _get("/api/v1/traffic", "getTraffic", "Recent traffic per model.", "observability",
         answers={200: Answer("The last minutes, per model.", api.TrafficView)}),
    _get(OPENAPI_PATH, "getOpenAPI", "This document.", "observability",
         answers={200: Answer("The OpenAPI 3.1 description of this API.",
                              media="application/json")}),
    # -- the dashboard
    *(
        _get(path, f"getDashboard{suffix}", "The dashboard page.", "dashboard",
             answers={200: Answer("The page.", media="text/html")}, security="public",
             description=_STATIC)
        for path, suffix in (("/dashboard", ""), ("/dashboard/", "Slash"))
    ),
    *(
        _get(f"/dashboard/{name}", "getDashboard" + _camel(name),
             f"The dashboard's {name}.", "dashboard",
             answers={200: Answer("The file.", media=content_type.split(";")[0])},
             security="public", description=_STATIC)
        for name, content_type in ASSETS.items()
    ),
    _get("/api/v1/dashboard/stream", "streamDashboard",
         "The dashboard's live data as server-sent events.", "dashboard",
         answers={200: Answer("`fleet` events at once and on changes, `traffic` events "
                              "every 2 s.", media=SSE,
                              events={"fleet": api.DashboardFleetView,
                                      "traffic": api.TrafficView})},
         streams=True),
    # -- agents
    _get(AGENT_SOCKET_PATH, "agentSocket", "The agents' WebSocket.", "agents",
         answers={101: Answer("Switching to the agent protocol: JSON text frames "
                              "(register, snapshot, command_result, deregister; see "
                              "corral.control.management).")},
         errors={400: "Not a WebSocket upgrade request."},
         security="cluster", streams=True),
    # -- the front door's own answers, on the inference listener
    *(
        _get(path, f"getHealth{suffix}", "The fleet's health.", "inference", answers=_HEALTH,
             security="public", listener="inference")
        for path, suffix in (("/health", ""), ("/v1/health", "V1"))
    ),
    *(
        _get(path, f"listModels{suffix}", "Every model, in router mode's shape.", "inference",
             answers=_LISTING, security="api_key", listener="inference",
             description="`status.value` is `loaded`, `loading` or `unloaded`.")
        for path, suffix in (("/v1/models", "V1"), ("/models", "Plain"))
    ),
    _get(SLOTS_AGGREGATE, "getFleetSlots", "Every instance's slots.", "inference",
         answers={200: Answer("Every instance.", api.SlotsAggregate)},
         security="api_key", listener="inference",
         description="Served only with the `expose_slots` setting (404 otherwise)."),
)  # fmt: skip

TAGS = (
    ("probes", "What an orchestrator asks: public, no fleet data."),
    ("fleet", "The balancer's picture of the fleet."),
    ("instances", "Admin actions on instances: each drains before it stops anything."),
    ("models", "Admin actions on a model host's models (`corral serve`)."),
    ("observability", "Metrics, recent traffic, and this document."),
    ("dashboard", "The web dashboard's page and its live data."),
    ("agents", "How agents join a balancer."),
    ("inference", "The front door's own answers, on the inference listener."),
)

SECURITY_SCHEMES = {
    "managementToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The management token (`management_token`, CORRAL_MANAGEMENT_TOKEN); "
        "`corral serve` on loopback generates one and says where to read it.",
    },
    "clusterToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The cluster token agents present (`cluster_token`, CORRAL_CLUSTER_TOKEN).",
    },
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A client API key (`api_keys`, CORRAL_API_KEYS). Without api_keys "
        "the inference routes are open.",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "The same API key, as Anthropic's clients send it.",
    },
}

DESCRIPTION = """\
corral's management API (fleet views, admin actions, metrics, the dashboard's data)
on the management listener, and the answers corral gives itself on the inference
listener beside the llama-server routes it forwards.

Every error is OpenAI-shaped: `{"error": {"code", "message", "type"}}`. Send the
management token as `Authorization: Bearer TOKEN`. Query parameters a route does not
name are ignored. Generated from corral's code: `corral openapi` prints this document."""


def _server(listener: Listener) -> dict[str, str]:
    setting = "management_addr" if listener == "management" else "inference_addr"
    address = Settings.model_fields[setting].default
    flag = "--" + setting.replace("_", "-")
    return {"url": f"http://{address}", "description": f"the {listener} listener ({flag})"}


#: A body model (and whether it is read or written) -> its ``$ref``.
Refs = Mapping[tuple[Any, JsonSchemaMode], Any]


def _schemas() -> tuple[Refs, dict[str, Any]]:
    """Every body model's JSON schema, ``$ref``-ing the shared ``components/schemas``."""
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (api.ErrorResponse, "serialization"): None
    }
    for operation in OPERATIONS:
        for answer in operation.answers.values():
            for model in (answer.body, *answer.events.values()):
                if model is not None:
                    wanted[(model, "serialization")] = None
        if operation.body is not None:
            wanted[(operation.body, "validation")] = None
    refs, top = models_json_schema(list(wanted), ref_template="#/components/schemas/{model}")
    return refs, dict(sorted(top.get("$defs", {}).items()))


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PATH_PARAMETERS[name],
            "schema": {"type": "string", "minLength": 1},
        }
        for name in re.findall(r"\{(\w+)\}", operation.path)
    ]
    if operation.query is not None:
        schema = operation.query.model_json_schema(mode="validation")
        assert "$defs" not in schema, "query parameters are plain values"
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = {k: v for k, v in prop.items() if k != "title"}
            description = prop.pop("description", "")
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "description": description,
                    "schema": prop,
                }
            )
    return parameters


def _responses(operation: Operation, refs: Refs) -> dict[str, Any]:
    error = {"application/json": {"schema": refs[(api.ErrorResponse, "serialization")]}}
    errors = dict(operation.errors)
    if operation.security != "public":
        errors[401] = UNAUTHORIZED[operation.security]
    responses: dict[int, Any] = {}
    for status, answer in operation.answers.items():
        content: dict[str, Any] = {}
        if answer.body is not None:
            content["application/json"] = {"schema": refs[(answer.body, "serialization")]}
        if answer.media is not None:  # a JSON document of its own (this one), else text
            kind = "object" if answer.media == "application/json" else "string"
            content[answer.media] = {"schema": {"type": kind}}
        if answer.events:
            content[answer.media or SSE]["x-corral-events"] = {
                name: refs[(model, "serialization")] for name, model in answer.events.items()
            }
        responses[status] = {"description": answer.description}
        if content:
            responses[status]["content"] = content
    for status, when in errors.items():
        responses[status] = {"description": when, "content": error}
    return {str(status): responses[status] for status in sorted(responses)}


def _operation(operation: Operation, refs: Refs) -> dict[str, Any]:
    described: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
    }
    if operation.description:
        described["description"] = operation.description
    parameters = _parameters(operation)
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(operation.body, "validation")]}},
        }
    described["responses"] = _responses(operation, refs)
    if operation.security != "management":  # the document's default
        described["security"] = SECURITY[operation.security]
    if operation.streams:
        described["x-corral-streams"] = True
    return described


def build_openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a JSON-ready dict (a fresh one per call)."""
    refs, schemas = _schemas()
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        item = paths.setdefault(operation.path, {})
        if operation.listener != "management":
            item["servers"] = [_server(operation.listener)]
        item[operation.method.lower()] = _operation(operation, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "corral",
            "version": __version__,
            "summary": "A fleet manager for llama.cpp's llama-server.",
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [_server("management")],
        "security": SECURITY["management"],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


@cache
def openapi_text() -> str:
    """The document as ``docs/openapi.json`` holds it (built once per process)."""
    return json.dumps(build_openapi(), indent=2, ensure_ascii=False) + "\n"
