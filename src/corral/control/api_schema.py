"""The typed shapes of the management API and of the front door's own answers.

Every JSON body a management route answers with, and every query parameter and request
body it takes, is one of these pydantic models. The handlers build their answers
through them (:func:`reply`) and read their query parameters through them
(:func:`parse_query`), and :mod:`corral.control.openapi` turns the same classes into
the OpenAPI document, so the description and the code cannot say different things.

Answers are closed (``extra="forbid"``, ``additionalProperties: false``): a key a
handler adds without adding it here fails the tests that validate real answers, rather
than going out undocumented. Fields with a default are the optional ones: they are left
out of an answer unless a handler sets them (``supervisor`` of an instance nobody
supervises, ``port`` of a reconfigure that changed none).

The views of the fleet (:meth:`corral.fleet.state.Instance.as_dict` and friends) keep
their dict builders, which other readers share; the handlers pass those dicts through
the models here, which checks them. Fields that come from agents over the wire are
typed as the wire is (:mod:`corral.protocol`: a supervisor's ``state`` is any string),
so a newer agent's value is shown, not refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError
from pydantic.json_schema import SkipJsonSchema

from corral.catalog.model import Source
from corral.fleet.state import InstanceState
from corral.hosting import ModelState
from corral.observe.autoscaling import TARGET_UTILIZATION

#: Seconds an instance's requests in flight get to finish before it restarts
#: (``?drain_timeout=``).
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds a rolling restart waits for each instance to be ready again (``?ready_timeout=``).
DEFAULT_READY_TIMEOUT = 300.0
#: Log lines an instance's logs route answers with (``?lines=``), and the most it gives.
DEFAULT_LOG_LINES = 200
MAX_LOG_LINES = 5000
#: Longest a load call waits for the model to be ready before answering 202 (``?wait=``).
LOAD_WAIT_S = 300.0

# -- the two kinds of model ---------------------------------------------------------------


class Reply(BaseModel):
    """A JSON answer: closed, every field named."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    """A route's query parameters: parsed from strings, unknown ones ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def optional(description: str) -> Any:
    """A field an answer may leave out (and never sends as null). The schema shows no
    default for it: being absent is the default."""
    return Field(default=None, description=description, json_schema_extra=_no_default)


def reply(answer: BaseModel, status: int = 200) -> web.Response:
    """``answer`` as a JSON response; optional fields nobody set are left out."""
    return web.json_response(answer.model_dump(mode="json", exclude_unset=True), status=status)


class BadInput(ValueError):
    """A request the route cannot take; the message says what to send instead (a 400)."""


Q = TypeVar("Q", bound=Query)


def parse_query(model: type[Q], request: web.Request) -> Q:
    """The query parameters ``model`` names, checked; :class:`BadInput` naming the
    parameter when one is malformed or given more than once."""
    values: dict[str, str] = {}
    for name in model.model_fields:
        given = request.query.getall(name, [])
        if len(given) > 1:
            raise BadInput(f"give the query parameter `{name}` once, not {len(given)} times")
        if given:
            values[name] = given[0]
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        message = first["msg"][:1].lower() + first["msg"][1:]
        raise BadInput(f"query parameter `{name}`: {message}, not {values.get(name)!r}") from None


# -- errors -----------------------------------------------------------------------------


class ErrorDetail(Reply):
    code: int = Field(description="The HTTP status, repeated.")
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(
        description="OpenAI's error type: `invalid_request_error`, `authentication_error`, "
        "`not_found_error`, `unavailable_error`, ...",
        examples=["authentication_error"],
    )


# the shape of corral.gateway.errors.error_body
class ErrorResponse(Reply):
    """Every error corral answers, in the shape OpenAI's API uses."""

    error: ErrorDetail


# -- probes -------------------------------------------------------------------------------


class ProbePassing(Reply):
    status: Literal["alive", "ready"]


class ProbeFailing(Reply):
    status: Literal["not alive", "not ready"]
    reason: str = Field(description="Why, in words (starting, shutting down, a stalled loop).")


# -- the fleet ----------------------------------------------------------------------------


# the shape of corral.fleet.state.Agent.as_dict
class AgentView(Reply):
    """An agent registered with this balancer."""

    id: str
    name: str
    remote: str = Field(description="The address its WebSocket came from.")
    connected_at: float = Field(description="Unix time it registered.")
    last_seq: int = Field(description="The sequence number of its last snapshot applied.")
    instances: list[str] = Field(description="The ids of the instances it reports.")


class IssueView(Reply):
    kind: str = Field(examples=["unreachable", "unauthorized", "loading"])
    message: str


# the shape of corral.protocol.SupervisorReport.to_wire
class DeviceView(Reply):
    """An accelerator the server's binary can use (its ``--list-devices``)."""

    name: str = Field(examples=["CUDA0"])
    description: str
    total_mib: int
    free_mib: int = Field(description="Free when the binary was asked, before any load.")


class SupervisorView(Reply):
    """The supervising agent's view of the llama-server process."""

    state: str = Field(
        description="`starting`, `ready`, `failed` (it gave up restarting) or `stopped`.",
        examples=["ready"],
    )
    pid: int | None
    restarts: int
    launches: int
    failed_runs: int
    readies: int
    startup_seconds: list[float] = Field(description="Launch to ready, for recent readies.")
    last_exit_code: int | None
    last_error: str | None
    ready_since: float | None
    log_tail: list[str] = Field(description="The process's last output lines.")
    devices: list[DeviceView] = Field(
        description="Accelerators the binary can use; empty: the CPU only (or not known)."
    )


# the shape of corral.fleet.state.Instance.as_dict
class InstanceView(Reply):
    """One llama-server as the balancer sees it."""

    id: str = Field(description="`AGENT/LOCAL`: the admin routes' path.")
    agent_id: str
    url: str = Field(description="Where the balancer reaches it.")
    model: str
    aliases: list[str]
    state: InstanceState
    usable: bool = Field(description="Takes requests now: ready, fresh, no issue, breaker shut.")
    stale: bool = Field(description="Its agent has not reported it lately.")
    draining: bool
    slots_total: int
    slots_busy: int
    slots_free: int
    reported_busy: int = Field(description="Busy slots as its agent last read them.")
    slot_source: str = Field(
        description="Where busy slots come from: `slots`, `metrics` or `balancer`."
    )
    sleeping: bool
    in_flight: int = Field(description="This balancer's requests running on it.")
    n_ctx: int
    issues: list[IssueView]
    breaker: Literal["closed", "open", "half-open"]
    served: int = Field(description="Requests this balancer sent it.")
    seen_since: float = Field(description="Unix time the balancer first saw it.")
    supervisor: SupervisorView | SkipJsonSchema[None] = optional(
        "Absent when its agent only watches the server."
    )


class AgentsList(Reply):
    agents: list[AgentView]


class InstancesList(Reply):
    instances: list[InstanceView]


class BufferView(Reply):
    """Requests waiting for a slot or a model."""

    buffered: int
    by_model: dict[str, int] = Field(
        description="Waiting requests by model; `(any)` for those that name none."
    )
    max_buffered_requests: int
    buffered_request_timeout: float


class FleetView(Reply):
    """The whole picture: what `corral status` shows."""

    version: str = Field(description="corral's version.")
    time: float = Field(description="Unix time of this view.")
    agents: list[AgentView]
    instances: list[InstanceView]
    buffered: dict[str, int]
    models: list[str] = Field(description="Models with at least one instance, sorted.")


# the shape of corral.observe.autoscaling.ModelDemand
class ModelDemandView(Reply):
    """One model's autoscaling inputs and the instances they call for."""

    model: str
    wanted_instances: int
    instances: int
    instances_ready: int
    slots_total: int
    slots_busy: int
    buffered: int
    target_utilization: float


class FleetDemandView(Reply):
    target_utilization: float
    wanted_instances: int = Field(description="The sum over models.")
    models: dict[str, ModelDemandView]


class AutoscalingView(RootModel[FleetDemandView | ModelDemandView]):
    """Every model's demand, or one model's with `?model=`."""


class AutoscalingQuery(Query):
    target: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        default=TARGET_UTILIZATION, description="The share of slots to keep busy."
    )
    model: str | SkipJsonSchema[None] = optional("Answer for this model alone, at the top level.")


# -- traffic and the dashboard ------------------------------------------------------------


class TrafficPoint(Reply):
    t: float = Field(description="Unix time the bucket starts.")
    requests: int
    errors: int
    p50: float | None = Field(description="Median duration in seconds; null when idle.")


class ModelTraffic(Reply):
    series: list[TrafficPoint] = Field(description="Oldest first, idle buckets included.")
    requests: int
    errors: int = Field(description="5xx, 429 and 504 answers.")
    rate: float = Field(description="Requests per second over the last minute.")
    p50: float | None
    p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None


# the shape of corral.observe.recent.RecentTraffic.summary
class TrafficView(Reply):
    """Recent traffic per model."""

    time: float
    bucket_seconds: float
    window_seconds: float
    models: dict[str, ModelTraffic]


# the shape of corral.supervisor.host.ModelHost.status
class CatalogEntry(Reply):
    """One model of a model host's catalog."""

    id: str
    aliases: list[str]
    state: ModelState
    unlisted: bool
    group: str | None
    size_bytes: int
    context_length: int | None
    quantization: str | None
    source: Source
    server: Literal["llama-server", "command"]
    error: str | None = Field(description="Why its last load failed.")
    args: list[str] = Field(description="The llama-server arguments it starts with.")
    created: int = Field(description="Unix time of its file.")
    hosts: list[str] = Field(
        default_factory=list,
        description="The machines that can start it: `local` (this one) or model hosts' names.",
    )
    running_on: str | None = Field(default=None, description="Where it runs (or loads) now.")


class HostServer(Reply):
    key: str = Field(description="Its pool: the model, or the model with per-request flags.")
    model: str
    state: ModelState
    url: str


class HostView(Reply):
    """One machine models run on: this one (`local`) or a model host (an agent with
    `--models-dir`)."""

    id: str
    name: str
    memory_total: int = Field(description="Bytes (its --max-memory when set).")
    memory_available: int = Field(description="Bytes free for another server now.")
    max_instances: int
    devices: list[DeviceView]
    models: list[str] = Field(description="The models it can start.")
    servers: list[HostServer] = Field(description="What it runs for this balancer.")


class DashboardFleetView(FleetView):
    """The dashboard stream's `fleet` event: the fleet, with the host's catalog."""

    catalog: list[CatalogEntry] | None = Field(
        description="null for a balancer without a model host."
    )
    hosts: list[HostView] | None = Field(
        default=None,
        description="The machines models run on (`GET /api/v1/hosts`); null without a model host.",
    )


# -- instance admin ------------------------------------------------------------------------


class DrainQuery(Query):
    drain_timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=DEFAULT_DRAIN_TIMEOUT, description="Seconds requests in flight get to finish first."
    )


class RollingRestartQuery(DrainQuery):
    ready_timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=DEFAULT_READY_TIMEOUT, description="Seconds each instance gets to be ready again."
    )


class LogsQuery(Query):
    lines: Annotated[int, Field(ge=0)] = Field(
        default=DEFAULT_LOG_LINES,
        description=f"How many of the last lines (at most {MAX_LOG_LINES}).",
    )
    follow: bool = Field(
        default=False, description="Stream new lines as server-sent events after these."
    )


#: One llama-server argument as the API takes it: any text but a NUL byte (which no
#: process argument can hold); :func:`corral.supervisor.flags.check_llama_args` then
#: refuses the flags corral owns.
LlamaArg = Annotated[str, Field(pattern=r"^[^\x00]*$")]


class ReconfigureRequest(BaseModel):
    """New llama-server arguments and/or a new loopback port (at least one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    args: list[LlamaArg] | SkipJsonSchema[None] = optional(
        "The instance's llama-server arguments from now on (corral's own, such as --port, "
        '--host and --model, are refused), e.g. `["--parallel", "4"]`.'
    )
    port: Annotated[int, Field(ge=1, le=65535)] | SkipJsonSchema[None] = optional(
        "The loopback port it listens on from now on."
    )


class RestartAnswer(Reply):
    instance: str
    restarting: Literal[True]
    drained: bool = Field(description="False when requests were still running at the timeout.")


class ReconfigureAnswer(RestartAnswer):
    args: list[str] | SkipJsonSchema[None] = optional("The checked arguments, if given.")
    port: int | SkipJsonSchema[None] = optional("The new port, if given.")


class LogsAnswer(Reply):
    instance: str
    lines: list[str]
    cursor: int = Field(description="How many lines the process has written in all.")


class RestartStep(Reply):
    instance: str
    drained: bool
    ready: bool


class RollingRestartAnswer(Reply):
    model: str
    restarted: list[RestartStep]


# -- model admin ---------------------------------------------------------------------------


class ModelsList(Reply):
    models: list[CatalogEntry]
    problems: list[str] = Field(description="Files the last scan could not use, and why.")


class LoadQuery(Query):
    wait: bool = Field(
        default=True, description=f"Wait until the model serves (up to {LOAD_WAIT_S:g} s)."
    )
    host: str | None = Field(
        default=None,
        description="Load it on this model host (its name or id, or `local`) instead of "
        "where the planner would.",
    )


class HostsList(Reply):
    hosts: list[HostView]


class LoadAnswer(Reply):
    model: str = Field(description="The model's id (the name may have been an alias).")
    state: Literal["loaded", "loading"]


class UnloadAnswer(Reply):
    model: str
    state: Literal["unloaded"]


class RescanAnswer(Reply):
    added: list[str]
    removed: list[str]
    updated: list[str]
    models: list[str] = Field(description="Every model of the catalog now.")


# the shape of corral.serve.LocalServe.reload's answer
class ReloadAnswer(Reply):
    changed: list[str] = Field(description="Models whose settings changed.")
    unloaded: list[str] = Field(description="Of those, the ones that were running (drained).")
    models: list[str]
    restart_required: list[str] = Field(description="Settings that need a restart to apply.")


# -- the front door's own answers (corral.gateway.listing) ----------------------------------


# the shapes of corral.gateway.listing's answers
class HealthView(Reply):
    """The fleet's health: `ok` while any instance takes requests."""

    status: Literal["ok", "unavailable"]
    instances_ready: int
    instances_total: int
    slots_free: int
    slots_busy: int
    buffered: int


class ListedStatus(Reply):
    value: Literal["loaded", "loading", "unloaded"]
    args: list[str] | SkipJsonSchema[None] = optional("Catalog models only.")
    instances: int


class ListedMeta(Reply):
    n_ctx: int
    n_ctx_train: int | None = optional("The training context; catalog models only.")
    size: int | SkipJsonSchema[None] = optional("Bytes; catalog models only.")
    quantization: str | None = optional("Catalog models only.")


class ListedModel(Reply):
    """A model as router-mode llama-server lists it."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    aliases: list[str]
    status: ListedStatus
    meta: ListedMeta


class ModelListing(Reply):
    object: Literal["list"]
    data: list[ListedModel]


class SlotsAggregate(RootModel[list[InstanceView]]):
    """Every instance with its slots."""
