"""corral's one source of truth for configuration.

Settings come from three places, in rising precedence: a YAML file, ``CORRAL_*``
environment variables, and command-line flags. Every top-level setting has an
environment variable named ``CORRAL_`` + its upper-cased name (``inference_addr`` ->
``CORRAL_INFERENCE_ADDR``); list settings take comma-separated values there. The
``models`` table is file-only.

Validation errors name the field, and for files also the line, so an operator can fix
a typo without reading a traceback. Unknown keys are errors, with a "did you mean"
suggestion when one is close.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from corral.template import (
    PLACEHOLDERS,
    placeholders,
    split_command,
    unknown_placeholders,
)

ENV_PREFIX = "CORRAL_"

PolicyName = Literal["least_busy", "round_robin", "random", "prefix"]

SlotSource = Literal["slots", "metrics", "balancer"]
"""How an agent counts busy slots (see :attr:`corral.agent.AgentOptions.slot_source`)."""


def _parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _known_placeholders(argument: str) -> str:
    unknown = unknown_placeholders(argument)
    if unknown:
        known = ", ".join("${" + p + "}" for p in PLACEHOLDERS)
        raise ValueError(
            f"unknown placeholder ${{{unknown[0]}}} (known: {known}; $${{ is a literal ${{)"
        )
    return argument


def _url_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value) or "?" in value:
        raise ValueError(f"expected a URL path starting with /, got {value!r}")
    return value


TemplateArgument = Annotated[str, AfterValidator(_known_placeholders)]
UrlPath = Annotated[str, AfterValidator(_url_path)]

#: Settings that only mean something for a model started from a command template.
TEMPLATE_ONLY = ("health_path", "paths", "slots")


class ModelFilters(BaseModel):
    """Changes to a request's JSON body before it goes upstream (llama-swap's
    ``filters``). ``model`` is never stripped or set: it routed the request."""

    model_config = ConfigDict(extra="forbid")

    strip_params: list[str] = Field(
        default_factory=list,
        description="Body keys removed from every request (e.g. temperature, top_p): "
        "server-side sampling settings clients cannot override.",
    )
    set_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Body keys set on every request, replacing the client's value.",
    )
    set_params_by_name: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Body keys set (after set_params) when the client asked for this "
        "name; each name is also an alias of the model: variants such as MODEL:high "
        "without another server.",
    )

    @model_validator(mode="after")
    def _never_model(self) -> ModelFilters:
        touched = [
            where
            for where, keys in (
                ("strip_params", self.strip_params),
                ("set_params", list(self.set_params)),
                *((f"set_params_by_name.{n}", list(p)) for n, p in self.set_params_by_name.items()),
            )
            if "model" in keys
        ]
        if touched:
            raise ValueError(
                f"{', '.join(touched)}: `model` routes the request and cannot be changed "
                "here (use use_model_name for the name sent upstream)"
            )
        return self


class ReplicaConfig(BaseModel):
    """How many instances of one model run across the fleet's hosts."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(
        default=0, ge=0, description="Instances kept running (0: it may scale to zero)."
    )
    max: int = Field(
        default=1,
        ge=1,
        description="Most instances, each on its own host: another starts when requests "
        "have waited replica_wait seconds with every slot busy.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaConfig:
        if self.min > self.max:
            raise ValueError(f"replicas: min ({self.min}) is more than max ({self.max})")
        return self


class ModelConfig(BaseModel):
    """One model a client can ask for by name (the ``models`` table of the file).

    A model is served by llama-server unless it has ``cmd``: then corral starts that
    command (see :mod:`corral.template`) and treats it as a generic
    OpenAI-compatible server: ready when ``health_path`` answers 200, ``slots``
    requests at once, only requests whose path starts with one of ``paths``.
    """

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        default=None,
        description="GGUF file this model loads (with cmd: ${model_path}, optional, any "
        "model name the server takes, e.g. a Hugging Face repo id).",
    )
    args: list[str] = Field(
        default_factory=list, description="Extra llama-server arguments for this model."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names for this model.")
    group: str | None = Field(default=None, description="Swap group this model belongs to.")
    ttl: float | None = Field(
        default=None, ge=0, description="Seconds idle before the instance is unloaded."
    )
    replicas: ReplicaConfig | None = Field(
        default=None,
        description="Instances across the fleet's hosts (unset: one, started on demand).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    unlisted: bool = Field(default=False, description="Hide from /v1/models.")
    preload: bool = Field(default=False, description="Start an instance at startup.")
    mmproj: Path | None = Field(
        default=None, description="Multimodal projector GGUF (else one found beside the model)."
    )
    cmd: list[TemplateArgument] | None = Field(
        default=None,
        description="Start this command instead of llama-server (a list, or a string split "
        "like shell words; never run by a shell). Placeholders: ${host}, ${port}, "
        "${model_id}, ${model_path}, ${mmproj}.",
    )
    health_path: UrlPath = Field(
        default="/health", description="With cmd: the path that answers 200 once it is ready."
    )
    paths: list[UrlPath] = Field(
        default_factory=lambda: ["/v1/"],
        min_length=1,
        description="With cmd: URL path prefixes the server answers; other paths get 404.",
    )
    slots: int = Field(
        default=4,
        ge=1,
        description="With cmd: requests it takes at once (it has no /slots to ask).",
    )
    loading_notices: bool | None = Field(
        default=None,
        description="Loading notices for this model's waiting streaming chat requests "
        "(unset: the global loading_notices).",
    )
    filters: ModelFilters | None = Field(
        default=None,
        description="Body keys stripped or set on this model's requests before they go upstream.",
    )
    use_model_name: str | None = Field(
        default=None,
        min_length=1,
        description="The `model` sent upstream in place of the client's (for a server "
        "that checks it, e.g. vLLM's --served-model-name).",
    )
    stop_grace: float | None = Field(
        default=None,
        ge=0,
        description="Seconds between SIGTERM and SIGKILL when this model's server stops "
        "(unset: the global stop_grace).",
    )

    @field_validator("cmd", mode="before")
    @classmethod
    def _split_cmd(cls, value: object) -> object:
        return split_command(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_template(self) -> ModelConfig:
        if self.cmd is None:
            stray = [name for name in TEMPLATE_ONLY if name in self.model_fields_set]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply to a model started from cmd (llama-server "
                    "models report their own health and slots)"
                )
            return self
        if not self.cmd or not self.cmd[0]:
            raise ValueError("cmd: give the program to run and its arguments")
        if self.args:
            raise ValueError(
                "args are llama-server arguments; a model with cmd takes its arguments in cmd"
            )
        used = {name for argument in self.cmd for name in placeholders(argument)}
        if "port" not in used:
            raise ValueError(
                "cmd never uses ${port}: the server must listen on the port corral assigns"
            )
        if "model_path" in used and self.path is None:
            raise ValueError("cmd uses ${model_path} but path is not set")
        if "mmproj" in used and self.mmproj is None:
            raise ValueError("cmd uses ${mmproj} but mmproj is not set")
        return self


class GroupConfig(BaseModel):
    """How the models of one group share the machine (the ``groups`` table)."""

    model_config = ConfigDict(extra="forbid")

    exclusive: bool = Field(
        default=True,
        description="Members swap with each other (one runs at a time); false: they may "
        "run together.",
    )
    persistent: bool = Field(
        default=False, description="Members are never evicted to make room for other models."
    )


class Settings(BaseModel):
    """All of corral's settings. Defaults are documented here, where they are defined."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- front door ---------------------------------------------------------------
    inference_addr: str = Field(
        default="127.0.0.1:8080", description="HOST:PORT of the inference API."
    )
    management_addr: str = Field(
        default="127.0.0.1:8085",
        description="HOST:PORT of the management API, agent endpoint and dashboard.",
    )
    management_token: SecretStr | None = Field(
        default=None, description="Bearer token for every management route."
    )
    management_token_file: Path | None = Field(
        default=None, description="File holding the management token."
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Inference API keys (Bearer or x-api-key). Empty: the API is open.",
    )
    cluster_token: SecretStr | None = Field(
        default=None, description="Shared secret agents present to register with a balancer."
    )
    cluster_token_file: Path | None = Field(
        default=None, description="File holding the cluster token."
    )
    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) the inference and management listeners serve "
        "TLS with (with tls_key); reloaded when the file changes.",
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle https:// balancers (for an agent) and https:// "
        "llama-servers (for an agent and a balancer) are verified against (default: the "
        "system's trust store).",
    )
    tls_client_ca: Path | None = Field(
        default=None,
        description="Balancer: PEM CA bundle agents' client certificates are verified "
        "against (mutual TLS; needs tls_cert). The management listener then asks every "
        "client for a certificate; people and tools without one still use the token.",
    )
    tls_client_cert: Path | None = Field(
        default=None,
        description="Agent: PEM client certificate (chain) it presents to balancers "
        "(mutual TLS, with tls_client_key); loaded again before a connection when it changed.",
    )
    tls_client_key: Path | None = Field(
        default=None, description="Agent: PEM private key of tls_client_cert."
    )
    llama_server_tls: bool = Field(
        default=False,
        description="Start the llama-servers corral runs (serve's models, an agent's "
        "--model) over https with tls_cert/tls_key; balancers verify them against tls_ca "
        "and that certificate, by chain only (they dial servers by address). Needs a "
        "llama-server built with OpenSSL: CORRAL_LLAMA_SERVER_CMAKE_ARGS=-DLLAMA_OPENSSL=ON "
        "corral llama-server install.",
    )
    agent_auth: Literal["token", "certificate", "both"] = Field(
        default="token",
        description="Balancer: what lets an agent register: the cluster token, a client "
        "certificate verified against tls_client_ca, or both.",
    )
    policy: PolicyName = Field(default="least_busy", description="Placement policy.")
    pin_slots: bool = Field(
        default=False,
        description="With the prefix policy: send each chat or completion request to the "
        "llama-server slot holding its prefix (id_slot). Only where this balancer is the "
        "servers' one client.",
    )
    max_buffered_requests: int = Field(
        default=30, ge=0, description="Requests a model's buffer holds; 0 disables buffering."
    )
    buffered_request_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a request may wait in the buffer (then 504)."
    )
    max_request_body_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="Largest accepted request body (then 413)."
    )
    client_header_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client connection has to send a complete request head, from "
        "its opening or its last response (then it is closed; idle keep-alive ones too).",
    )
    client_body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a client has to send a request body in full (then 408).",
    )
    max_client_connections: int = Field(
        default=4096,
        ge=1,
        description="Client connections open at once on each listener; more are answered "
        "503 and closed.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS on the inference API."
    )
    upstream_connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to connect to a llama-server."
    )
    upstream_first_byte_timeout: float = Field(
        default=600.0, gt=0, description="Seconds to wait for a llama-server's response head."
    )
    upstream_idle_timeout: float = Field(
        default=300.0, gt=0, description="Seconds allowed between two chunks of a response."
    )
    max_retries: int = Field(
        default=2, ge=0, description="Retries on another instance before the first byte."
    )
    default_model: str | None = Field(
        default=None,
        description="The model (id or alias) a request goes to when it names none, or names "
        "a model no id, alias or alias pattern matches. Unset: with one model served, that "
        "one (as llama-server answers any name); with several, 400 or 404.",
    )
    expose_slots: bool = Field(
        default=False,
        description="Serve the fleet's slots at GET /corral/slots on the inference API "
        "(GET /slots is the instance's own, as llama-server answers it).",
    )
    loading_notices: bool = Field(
        default=False,
        description="A streaming chat request that waits for its model to load gets "
        "reasoning_content deltas saying what happens (loading X, unloading Y, ready) before "
        "the answer; models.*.loading_notices and the X-Corral-Loading-Notices header win.",
    )
    shutdown_timeout: float = Field(
        default=30.0, gt=0, description="Seconds in-flight requests may take to finish on exit."
    )
    statsd_addr: str | None = Field(
        default=None, description="HOST:PORT to push StatsD gauges to (off when unset)."
    )
    statsd_prefix: str = Field(default="corral", description="Prefix of StatsD gauge names.")
    agent_report_timeout: float = Field(
        default=3.0, gt=0, description="An instance leaves its pool after this long unreported."
    )

    # -- agent and processes ----------------------------------------------------------
    balancers: list[str] = Field(
        default_factory=list, description="Management addresses an agent reports to."
    )
    agent_name: str | None = Field(default=None, description="Name an agent reports as.")
    balancer_dns_interval: float = Field(
        default=15.0,
        gt=0,
        description="Seconds between an agent's lookups of balancers given by name (every "
        "address of the name is a balancer).",
    )
    local_llama_server: str | None = Field(
        default=None, description="URL of an external llama-server an agent watches."
    )
    external_llama_server: str | None = Field(
        default=None,
        description="URL the balancer uses to reach it, if different. For the llama-servers "
        "an agent starts (--model): a URL without a port gets each server's own port.",
    )
    llama_server_host: str = Field(
        default="127.0.0.1",
        description="Agent with --model: the address the llama-servers it starts listen on "
        "(0.0.0.0, or the host's address, for balancers on other hosts; with "
        "external_llama_server naming the address they dial).",
    )
    slot_source: SlotSource = Field(
        default="slots",
        description="How an agent counts a watched llama-server's busy slots: slots (GET "
        "/slots; /metrics under --no-slots), metrics (llamacpp:requests_processing) or "
        "balancer (each balancer counts its own requests). /slots counts as activity, so a "
        "llama-server with --sleep-idle-seconds needs metrics or balancer to ever sleep "
        "(corral picks balancer itself for the servers it starts with that flag).",
    )
    llama_server_api_key: SecretStr | None = Field(
        default=None,
        description="llama-server's --api-key: the agent reads /props and /slots with it, "
        "and a balancer that checks api_keys sends it upstream in place of the client's "
        "key (without api_keys, the client's own key goes through to llama-server).",
    )
    llama_server: Path | None = Field(
        default=None, description="llama-server binary (else LLAMA_SERVER, cache, PATH)."
    )
    max_instances: int | None = Field(
        default=None,
        ge=1,
        description="Most llama-server instances one agent runs (serve: 4 when unset, "
        "like llama-server's router mode).",
    )
    llama_args: list[str] = Field(
        default_factory=list, description="Base llama-server arguments for every model."
    )
    model_ttl: float | None = Field(
        default=None,
        ge=0,
        description="Default seconds idle before a model is unloaded (models.*.ttl wins); "
        "unset: never.",
    )
    drain_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds an instance may take to finish its requests before an "
        "eviction or unload gives up (it never kills them).",
    )
    replica_wait: float = Field(
        default=2.0,
        gt=0,
        description="Seconds requests for a model with replicas.max above 1 wait with every "
        "slot busy before another replica starts on another host.",
    )
    replica_idle: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a replica beyond replicas.min has nothing to do before it stops.",
    )
    swap_hold: float = Field(
        default=2.0,
        ge=0,
        description="Seconds a busy model whose place another model wants keeps taking "
        "new requests before it drains: alternating traffic then swaps in larger "
        "batches. An idle one is evicted at once; 0: drain at once.",
    )
    memory_check: bool = Field(
        default=True,
        description="Refuse or evict before loading a model whose estimated memory "
        "(file + KV cache) exceeds what is free.",
    )
    port_range: str = Field(
        default="5800-5999", description="Loopback ports for spawned llama-servers."
    )
    restart_backoff_initial: float = Field(
        default=1.0, gt=0, description="Seconds before the first restart of a crashed server."
    )
    restart_backoff_max: float = Field(
        default=60.0, gt=0, description="Longest wait between restarts (the backoff doubles)."
    )
    restart_max_failures: int = Field(
        default=5, ge=1, description="Failures within restart_failure_window that mean failed."
    )
    restart_failure_window: float = Field(
        default=300.0, gt=0, description="Seconds over which restart failures are counted."
    )
    start_attempts: int = Field(
        default=2,
        ge=1,
        description="Failed starts in a row after which a server that has never been ready "
        "is marked failed (bad flags or a bad file fail the same way every time).",
    )
    stop_grace: float = Field(
        default=10.0, ge=0, description="Seconds between SIGTERM and SIGKILL when stopping."
    )
    log_dir: Path | None = Field(
        default=None, description="Folder for rotating llama-server log files (memory only)."
    )
    startup_timeout: float = Field(
        default=120.0, gt=0, description="Seconds a llama-server may take to become ready."
    )
    models_dirs: list[Path] = Field(
        default_factory=list, description="Folders searched for GGUF models."
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="Models by id (file only)."
    )
    groups: dict[str, GroupConfig] = Field(
        default_factory=dict, description="Swap groups by name (file only)."
    )

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError(
                "tls_client_cert and tls_client_key go together: give both, or neither"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS on the listeners: set tls_cert and tls_key")
        if self.llama_server_tls and self.tls_cert is None:
            raise ValueError(
                "llama_server_tls serves llama-servers with tls_cert and tls_key: set both"
            )
        if self.agent_auth != "token" and self.tls_client_ca is None:
            raise ValueError(
                f"agent_auth: {self.agent_auth} checks agents' client certificates: set "
                "tls_client_ca (the CA that issues them)"
            )
        return self

    @field_validator("inference_addr", "management_addr", "statsd_addr")
    @classmethod
    def _check_addr(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_addr(value)
        return value

    @field_validator("port_range")
    @classmethod
    def _check_port_range(cls, value: str) -> str:
        low, sep, high = value.partition("-")
        if not sep or not low.isdigit() or not high.isdigit():
            raise ValueError(f"expected LOW-HIGH, got {value!r}")
        if not 0 < int(low) <= int(high) < 65536:
            raise ValueError(f"ports must satisfy 0 < LOW <= HIGH < 65536, got {value!r}")
        return value

    def inference_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.inference_addr)

    def management_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.management_addr)

    def ports(self) -> range:
        low, _, high = self.port_range.partition("-")
        return range(int(low), int(high) + 1)

    def resolved_management_token(self) -> str | None:
        """The management token from the setting, else from the token file."""
        return _secret(self.management_token, self.management_token_file)

    def resolved_cluster_token(self) -> str | None:
        """The cluster token from the setting, else from the token file."""
        return _secret(self.cluster_token, self.cluster_token_file)

    def resolved_api_keys(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]


def _secret(value: SecretStr | None, file: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        return file.read_text(encoding="utf-8").strip() or None
    return None


# -- errors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a configuration, with where it is."""

    field: str
    message: str
    source: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.field}: {self.message}"


class ConfigError(Exception):
    """Configuration could not be loaded; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# -- YAML with line numbers ------------------------------------------------------------


def _yaml_lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Record the 1-based line of every key and list item under ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*path, key)] = key_node.start_mark.line + 1
            _yaml_lines(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = item.start_mark.line + 1
            _yaml_lines(item, (*path, index), out)


def _read_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is fine
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigIssue("(file)", f"not valid YAML: {exc}", source, line)]) from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("(file)", "the top level must be a mapping", source, 1)])
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _yaml_lines(node, (), lines)
    return data, lines


# -- environment -----------------------------------------------------------------------

_LIST_FIELDS = {
    name
    for name, field in Settings.model_fields.items()
    if getattr(field.annotation, "__origin__", None) is list
}


def env_var_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        if name in ("models", "groups"):
            continue
        raw = environ.get(env_var_name(name))
        if raw is None:
            continue
        if name in _LIST_FIELDS:
            values[name] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            values[name] = raw
    return values


# -- validation with good messages -----------------------------------------------------


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model whose fields an error at ``loc`` names, for suggestions."""
    model: type[BaseModel] = Settings
    index = 0
    while index < len(loc) - 1:
        name = loc[index]
        if model is Settings and name in ("models", "groups"):
            model = ModelConfig if name == "models" else GroupConfig
            index += 2  # skip the model id
            continue
        return None
    return model


def _issues_from(
    exc: ValidationError, origin: Mapping[str, str], lines: Mapping[tuple[Any, ...], int]
) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            model = _model_for(loc)
            if model is not None:
                message = "unknown key" + _suggest(str(loc[-1]), list(model.model_fields))
        elif "input" in err and err["type"] not in ("missing",):
            shown = err["input"]
            if isinstance(shown, str | int | float | bool) and "SecretStr" not in str(err):
                secret = str(loc[0]) in ("management_token", "api_keys", "cluster_token") or (
                    str(loc[0]) == "llama_server_api_key"
                )
                if not secret:
                    message += f" (got {shown!r})"
        source = origin.get(str(loc[0]), "(config)") if loc else "(config)"
        line = lines.get(loc) if source not in ("(flags)", "(environment)") else None
        if line is None and source not in ("(flags)", "(environment)"):
            # point at the closest enclosing key we know the line of
            for cut in range(len(loc) - 1, 0, -1):
                if loc[:cut] in lines:
                    line = lines[loc[:cut]]
                    break
        issues.append(ConfigIssue(field, message, source, line))
    return issues


def load_settings(
    file: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from a YAML file, the environment and flag overrides.

    Later sources win field by field: file < ``CORRAL_*`` environment < flags.
    Raises :class:`ConfigError` naming every bad field (with its line in the file).
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    lines: dict[tuple[Any, ...], int] = {}
    if file is None and environ.get(ENV_PREFIX + "CONFIG"):
        file = environ[ENV_PREFIX + "CONFIG"]
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([ConfigIssue("(file)", f"cannot read: {exc}", str(path))]) from exc
        data, lines = _read_yaml(text, str(path))
        merged.update(data)
        origin.update({key: str(path) for key in data})
    env_values = _from_env(environ)
    merged.update(env_values)
    origin.update({key: "(environment)" for key in env_values})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        merged[key] = value
        origin[key] = "(flags)"
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_issues_from(exc, origin, lines)) from exc
    issues = []
    for model_id, model in settings.models.items():
        if model.group is not None and model.group not in settings.groups:
            known = ", ".join(sorted(settings.groups)) or "none defined"
            issues.append(
                ConfigIssue(
                    f"models.{model_id}.group",
                    f"unknown group {model.group!r} (groups: {known})"
                    + _suggest(model.group, list(settings.groups)),
                    origin.get("models", "(config)"),
                    lines.get(("models", model_id, "group")),
                )
            )
    if issues:
        raise ConfigError(issues)
    return settings


def check_file(path: Path | str) -> list[ConfigIssue]:
    """Validate a file alone (no environment, no flags) and list its problems."""
    try:
        load_settings(path, environ={})
    except ConfigError as exc:
        return exc.issues
    return []


def json_schema() -> str:
    return json.dumps(Settings.model_json_schema(), indent=2)
