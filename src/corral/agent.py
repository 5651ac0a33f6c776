"""The agent: watches one llama-server and reports it to every balancer it knows.

``corral agent --local-llama-server URL --balancer HOST:PORT`` runs this engine. It
polls the llama-server's ``/health``, ``/props`` and ``/slots`` (every
``poll_interval``, 0.25 s by default, so a slot that fills or frees reaches the
balancers within a fraction of a second) and keeps one long-lived WebSocket to each
balancer's management API (``/api/v1/agents/socket``, see
:mod:`corral.control.management` for the protocol). Over it the agent sends
``register`` first, then a ``snapshot`` at once whenever what it read changed and at
least every ``report_interval`` otherwise, and ``deregister`` when it stops.

Why push rather than let balancers poll: a balancer learns about a full or freed slot
one poll interval after llama-server does, whatever the number of balancers, and an
instance nobody reports for a while is taken out of its pool by the balancer.

Anything that goes wrong reading llama-server becomes a typed issue in the snapshot
(``unreachable``, ``unauthorized``, ``server_error``, ``loading``,
``bad_response``); any issue makes the instance unusable on the balancers until a
later read clears it. :func:`instance_from_readings` is that translation, pure, so it
is tested without servers.

The balancer may need another address than the one the agent polls (the agent polls
``127.0.0.1``; balancers on other hosts need the host's private address):
``external_llama_server`` gives it, and its host may be the literal
``aws:metadata:local-ipv4``, resolved once at start through the EC2 instance-metadata
service (IMDSv2: a session token first, then the address).

All state lives on one asyncio event loop. Tokens and API keys are never logged.

Defaults (:class:`AgentOptions`):

=======================  ============================  =====================================
option                   default                       why
=======================  ============================  =====================================
poll_interval            0.25 s                        slot changes reach balancers promptly
report_interval          1.0 s (at most 1.0 s)         the protocol's "at least once a second"
request_timeout          3.0 s                         /slots waits for llama-server's loop
backoff_initial          0.1 s, doubling               reconnect fast after a blip ...
backoff_max              5.0 s                         ... without hammering a dead balancer
metadata_base            http://169.254.169.254        the EC2 instance-metadata service
instance_id              "0"                           one watched server per agent
server_kind              llama-server                  see below
=======================  ============================  =====================================

Server kinds: a ``llama-server`` is read as above. A ``generic`` server (any other
OpenAI-compatible server, e.g. vLLM started from a model's command template) has no
``/props`` or ``/slots``: the agent reads only ``health_path`` and reports the model
name it was given with ``slots`` slots, none of them busy, so what is busy is exactly
what the balancer itself has in flight there. :func:`generic_instance` is that
translation, pure like :func:`instance_from_readings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import aiohttp
from yarl import URL

from corral import __version__
from corral.config import SlotSource
from corral.observe import redact
from corral.protocol import AGENT_SOCKET_PATH, InstanceReport, IssueReport, SupervisorReport

__all__ = [
    "AWS_LOCAL_IPV4_HOST",
    "DEFAULT_METADATA_BASE",
    "Agent",
    "AgentOptions",
    "BalancerLink",
    "MetadataError",
    "Reading",
    "balancer_socket_url",
    "generic_instance",
    "instance_from_readings",
    "model_name_from_props",
    "resolve_external_url",
    "run_agent",
]

log = logging.getLogger(__name__)

AWS_LOCAL_IPV4_HOST: Final = "aws:metadata:local-ipv4"
"""A host part of ``external_llama_server`` replaced by this EC2 host's private IPv4."""

DEFAULT_METADATA_BASE: Final = "http://169.254.169.254"
"""The EC2 instance-metadata service (settable, so tests point it at a fake)."""

METADATA_TOKEN_TTL_S: Final = 60
"""Lifetime asked for the IMDSv2 session token: it is used once, right away."""

BALANCER_CONNECT_TIMEOUT_S: Final = 10.0
"""Bound on connecting to a balancer and on its WebSocket handshake."""

BALANCER_HEARTBEAT_S: Final = 5.0
"""WebSocket ping interval towards a balancer; a silent one is dropped and redialled."""

MAX_ISSUE_MESSAGE: Final = 300
"""Characters of a llama-server error message kept in an issue."""

_SPLIT_SUFFIX: Final = re.compile(r"-\d{5}-of-\d{5}$")  # model-00001-of-00003.gguf


#: Seconds between re-reads of ``/props`` while nothing else suggests it changed.
PROPS_REFRESH = 2.0

ServerKind = Literal["llama-server", "generic"]


# ================================================================== options
SLOT_SOURCES: tuple[str, ...] = get_args(SlotSource)


@dataclass
class AgentOptions:
    """How an agent watches its llama-server and whom it reports to."""

    local_llama_server: str
    """URL the agent polls, e.g. ``http://127.0.0.1:8080``."""
    balancers: list[str]
    """Management addresses of every balancer: ``HOST:PORT`` or ``http(s)://`` URLs."""
    cluster_token: str
    """Sent as ``Authorization: Bearer`` on each balancer's agent socket."""
    external_llama_server: str | None = None
    """URL balancers should use if not ``local_llama_server``; its host may be
    ``aws:metadata:local-ipv4``."""
    llama_server_api_key: str | None = None
    """llama-server's ``--api-key``, sent as Bearer to ``/props`` and ``/slots``."""
    name: str = field(default_factory=socket.gethostname)
    """Shown by the balancers; the host name by default."""
    instance_id: str = "0"
    """Stable id of the watched server within this agent."""
    poll_interval: float = 0.25
    report_interval: float = 1.0
    request_timeout: float = 3.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    metadata_base: str = DEFAULT_METADATA_BASE
    model_name: str | None = None
    """The model's name when known before llama-server answers (a supervised server),
    so a server that never starts is still reported under its model."""
    extra_aliases: list[str] = field(default_factory=list)
    """More names to report for the model, besides what ``/props`` says."""
    on_command: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    """Runs a balancer's command (``restart``, ``reconfigure``, ``logs``) when a
    supervisor owns the process; gets the command and its message, returns a dict with
    ``ok`` and ``detail`` (and any data). None: this agent only watches and refuses."""
    server_kind: ServerKind = "llama-server"
    """``generic``: not a llama-server; read only ``health_path``, report ``slots``."""
    health_path: str = "/health"
    """A generic server's readiness path (200 when it serves)."""
    slots: int = 4
    """A generic server's slot count: requests it takes at once."""
    slot_source: SlotSource = "slots"
    """How busy slots are read. ``slots``: ``GET /slots`` (``/metrics`` when the server
    has ``--no-slots``). ``/slots`` counts as activity for llama-server's
    ``--sleep-idle-seconds``, so a server that should sleep needs one of the two that
    do not: ``metrics`` (``llamacpp:requests_processing``; each read also restarts the
    server's per-scrape rate gauges, ``prompt_tokens_seconds`` and
    ``predicted_tokens_seconds``) or ``balancer`` (read nothing: each balancer counts
    its own requests). With either, ``/props`` is read every poll to report
    ``sleeping`` (it does not wake the server)."""

    tls: ssl.SSLContext | None = None
    """What ``wss://`` (``https://``) balancers are verified with; None: the system's
    trust store (see :func:`corral.tls.client_context`)."""
    tls_reload: Callable[[], object] | None = None
    """Called before each connection to a balancer: reloads a rotated client
    certificate into :attr:`tls` (:meth:`corral.tls.ClientCertificate.reload_if_changed`)."""
    upstream_tls: ssl.SSLContext | None = None
    """What an ``https://`` llama-server is verified with; None: the system's trust
    store."""
    balancer_dns_interval: float = 15.0
    """Seconds between lookups of balancers given by name: every address of the name is
    a balancer (a Kubernetes headless Service has one per pod), so addresses that appear
    get a connection of their own and those that go lose theirs, without a restart."""
    resolve: Callable[[str, int], Awaitable[list[str]]] | None = None
    """Looks a balancer's name up; None: the system's resolver
    (:func:`resolve_balancers`). Tests give their own."""

    def __post_init__(self) -> None:
        if not self.balancers:
            raise ValueError("balancers: give at least one balancer management address")
        for address in self.balancers:
            balancer_socket_url(address)  # raises ValueError naming the bad address
        if not self.cluster_token:
            raise ValueError("cluster_token: required (CORRAL_CLUSTER_TOKEN)")
        for name in ("local_llama_server", "external_llama_server"):
            value = getattr(self, name)
            if value is not None and not value.startswith(("http://", "https://")):
                raise ValueError(f"{name}: expected an http:// or https:// URL, got {value!r}")
        if self.slot_source not in SLOT_SOURCES:
            raise ValueError(
                f"slot_source: one of {', '.join(SLOT_SOURCES)}, got {self.slot_source!r}"
            )
        if self.poll_interval <= 0:
            raise ValueError("poll_interval: must be > 0")
        if not 0 < self.report_interval <= 1.0:
            raise ValueError("report_interval: must be > 0 and at most 1.0 s")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout: must be > 0")
        if self.balancer_dns_interval <= 0:
            raise ValueError("balancer_dns_interval: must be > 0")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff_initial: must be > 0 and at most backoff_max")
        if self.server_kind not in ("llama-server", "generic"):
            raise ValueError(
                f"server_kind: expected llama-server or generic, got {self.server_kind!r}"
            )
        if self.server_kind == "generic":
            if not self.model_name:
                raise ValueError("model_name: a generic server cannot name its model: give it")
            if self.slots < 1:
                raise ValueError("slots: must be >= 1")
            if not self.health_path.startswith("/"):
                raise ValueError(
                    f"health_path: expected a path starting with /, got {self.health_path!r}"
                )


async def resolve_balancers(host: str, port: int) -> list[str]:
    """Every address of ``host``, sorted: its IPv4 ones when it has any (a dual-stack
    name would otherwise count each balancer twice), else its IPv6 ones."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
    return v4 or sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})


def _is_name(host: str) -> bool:
    """A DNS name to look up, rather than an address."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    return False


def balancer_socket_url(address: str) -> str:
    """The agent-socket WebSocket URL of a balancer given as ``HOST:PORT`` or a URL."""
    raw = address.strip()
    if not raw:
        raise ValueError("balancer address is empty")
    if "://" not in raw:
        raw = "http://" + raw
    url = URL(raw)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if url.scheme not in schemes or not url.host:
        raise ValueError(f"balancer address {address!r}: expected HOST:PORT or an http(s):// URL")
    url = url.with_scheme(schemes[url.scheme])
    if url.path in ("", "/"):
        url = url.with_path(AGENT_SOCKET_PATH)
    return str(url)


# ================================================================ readings
@dataclass(frozen=True)
class Reading:
    """What one GET to llama-server gave: an HTTP answer, or why there was none."""

    status: int | None = None
    """HTTP status; None when no answer came (see ``error``)."""
    body: bytes = b""
    error: str | None = None
    """Why no answer came: connection refused, timed out, ..."""

    @classmethod
    def ok(cls, data: Any) -> Reading:
        """A 200 answer with ``data`` as its JSON body (handy in tests)."""
        return cls(status=200, body=json.dumps(data).encode())


class _BadResponse(Exception):
    pass


def _issue(kind: str, message: str) -> dict[str, str]:
    return {"kind": kind, "message": message}


def _error_message(body: bytes) -> str:
    """llama-server's ``{"error": {"message"}}``, else the start of the body."""
    text = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = json.loads(text)["error"]["message"]
        if isinstance(message, str):
            text = message
    text = " ".join(text.split())
    return text[:MAX_ISSUE_MESSAGE] or "(empty body)"


def _classify(path: str, reading: Reading) -> dict[str, str] | None:
    """The issue a non-200 reading is, or None for a 200."""
    if reading.status is None:
        return _issue(
            "unreachable", f"GET {path}: no answer from llama-server ({reading.error or 'unknown'})"
        )
    status = reading.status
    if status == 200:
        return None
    detail = _error_message(reading.body)
    if status in (401, 403):
        return _issue(
            "unauthorized",
            f"GET {path} answered HTTP {status} ({detail}): set the agent's llama-server API "
            "key to one of llama-server's --api-key values",
        )
    if status == 503 and "loading" in detail.lower():
        return _issue("loading", f"llama-server is loading its model (GET {path}: {detail})")
    if status >= 500:
        return _issue("server_error", f"GET {path} answered HTTP {status}: {detail}")
    return _issue("bad_response", f"GET {path} answered unexpected HTTP {status}: {detail}")


def _json(path: str, reading: Reading) -> Any:
    try:
        return json.loads(reading.body)
    except ValueError as exc:
        raise _BadResponse(f"GET {path}: body is not JSON ({exc})") from None


def _int_field(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadResponse(f"{where}: `{key}` is {value!r}, expected a non-negative integer")
    return value


def model_name_from_props(model_alias: str, model_path: str) -> tuple[str, list[str]]:
    """The model name (and extra aliases) an instance serves, from llama-server's /props.

    llama-server reports ``--alias`` as ``model_alias``, or, without one, the model
    file's name (``tiny.gguf``). corral names a model by its alias, else by the file's
    stem (``tiny``, split suffix ``-00001-of-00003`` dropped) and keeps the file name as
    an alias, so clients asking for either reach it.
    """
    filename = re.split(r"[\\/]", model_path)[-1] if model_path else ""
    stem = filename.removesuffix(".gguf").removesuffix(".GGUF")
    stem = _SPLIT_SUFFIX.sub("", stem)
    if model_alias and model_alias not in (filename, model_path):
        return model_alias, []
    model = stem or model_alias
    aliases = [n for n in dict.fromkeys((model_alias, filename)) if n and n != model]
    return model, aliases


def _parse_props(reading: Reading) -> dict[str, Any]:
    data = _json("/props", reading)
    if not isinstance(data, dict):
        raise _BadResponse(f"GET /props: expected a JSON object, got {type(data).__name__}")
    alias = data.get("model_alias") or ""
    path = data.get("model_path") or ""
    if not isinstance(alias, str) or not isinstance(path, str):
        raise _BadResponse("GET /props: `model_alias` and `model_path` must be strings")
    if not alias and not path:
        raise _BadResponse("GET /props: neither `model_alias` nor `model_path` names the model")
    model, aliases = model_name_from_props(alias, path)
    settings = data.get("default_generation_settings")
    if not isinstance(settings, dict):
        raise _BadResponse("GET /props: `default_generation_settings` is missing")
    return {
        "model": model,
        "aliases": aliases,
        "total_slots": _int_field(data, "total_slots", "GET /props"),
        "n_ctx": _int_field(settings, "n_ctx", "GET /props default_generation_settings"),
        "sleeping": data.get("is_sleeping") is True,
    }


def _parse_slots(reading: Reading) -> int:
    """Busy slots: those with ``is_processing`` true."""
    data = _json("/slots", reading)
    if not isinstance(data, list) or not all(
        isinstance(s, dict) and isinstance(s.get("is_processing"), bool) for s in data
    ):
        raise _BadResponse("GET /slots: expected a list of slots, each with `is_processing`")
    return sum(1 for s in data if s["is_processing"])


_PROCESSING = re.compile(rb"^llamacpp:requests_processing(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def _parse_processing(reading: Reading) -> int | None:
    """Busy slots from llama-server's ``/metrics`` (``llamacpp:requests_processing``),
    or None when it does not say."""
    match = _PROCESSING.search(reading.body)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return max(0, int(value)) if value == value else None  # NaN says nothing


def instance_from_readings(
    *,
    instance_id: str,
    url: str,
    health: Reading,
    props: Reading | None,
    slots: Reading | None,
    metrics: Reading | None = None,
    previous: Mapping[str, Any] | None = None,
    blind: bool = False,
) -> dict[str, Any]:
    """One snapshot instance from what llama-server answered; pure.

    ``props`` or ``slots`` is None when it was not read (llama-server unreachable).
    What could not be read keeps its ``previous`` value, so an instance with a
    passing problem keeps its model (and its pool) while the issue sets it aside.

    A llama-server started with ``--no-slots`` answers ``/slots`` with 501; it is
    served all the same, and ``slot_source`` says where its busy count comes from:
    ``slots`` (``/slots``, what it normally is), ``metrics`` (``/metrics``'
    ``llamacpp:requests_processing``, read instead of ``/slots`` when the server has
    ``--metrics``; ``metrics`` is that reading), or ``balancer``: the agent sees no slot
    use at all and reports none busy, so each balancer counts only its own requests
    there (other balancers' and direct clients' work is invisible); ``blind`` asks for
    that without reading either (:attr:`AgentOptions.slot_source` ``balancer``).

    ``sleeping`` is ``/props``' ``is_sleeping`` (``--sleep-idle-seconds``): the model
    is unloaded until the next request, which wakes it; the instance stays usable.
    """
    known = dict(previous or {})
    instance: dict[str, Any] = {
        "id": instance_id,
        "url": url,
        "model": str(known.get("model") or ""),
        "aliases": list(known.get("aliases") or []),
        "state": "ready",
        "total_slots": int(known.get("total_slots") or 0),
        "busy": int(known.get("busy") or 0),
        "n_ctx": int(known.get("n_ctx") or 0),
        "slot_source": str(known.get("slot_source") or "slots"),
        "sleeping": bool(known.get("sleeping")),
        "issues": [],
    }
    issues: dict[str, str] = {}  # kind -> message, first one kept
    no_slots = (slots is None and metrics is not None) or (
        slots is not None and slots.status == 501
    )
    if blind:
        slots = None
        instance["slot_source"], instance["busy"] = "balancer", 0
    elif no_slots:
        slots = None
        processing = None
        if metrics is not None and metrics.status == 200:
            processing = _parse_processing(metrics)
        instance["slot_source"] = "metrics" if processing is not None else "balancer"
        instance["busy"] = processing or 0
    elif slots is not None and slots.status == 200:
        instance["slot_source"] = "slots"
    for path, reading in (("/health", health), ("/props", props), ("/slots", slots)):
        if reading is None:
            continue
        issue = _classify(path, reading)
        if issue is None:
            try:
                if path == "/props":
                    instance.update(_parse_props(reading))
                elif path == "/slots":
                    instance["busy"] = _parse_slots(reading)
            except _BadResponse as exc:
                issue = _issue("bad_response", str(exc))
        if issue is not None:
            issues.setdefault(issue["kind"], issue["message"])
    instance["busy"] = min(instance["busy"], instance["total_slots"])
    if "unreachable" in issues:
        instance["state"] = "failed"
    elif "loading" in issues:
        instance["state"] = "starting"
    instance["issues"] = [_issue(kind, message) for kind, message in issues.items()]
    return instance


def generic_instance(
    *,
    instance_id: str,
    url: str,
    model: str,
    slots: int,
    health: Reading,
    health_path: str = "/health",
) -> dict[str, Any]:
    """One snapshot instance of a generic (not llama-server) server; pure.

    Only its health says anything: 200 is ready, anything else an issue. Its slots are
    the configured count with none busy: the balancer's own in-flight requests are the
    only use it can know of.
    """
    issue = _classify(health_path, health)
    state = "ready"
    if issue is not None and issue["kind"] == "unreachable":
        state = "failed"
    elif issue is not None and issue["kind"] == "loading":
        state = "starting"
    return {
        "id": instance_id,
        "url": url,
        "model": model,
        "aliases": [],
        "state": state,
        "total_slots": slots,
        "busy": 0,
        "n_ctx": 0,
        "issues": [issue] if issue is not None else [],
    }


# ========================================================== external address
class MetadataError(Exception):
    """The instance-metadata service could not give this host's address."""


async def _local_ipv4(session: aiohttp.ClientSession, metadata_base: str, limit_s: float) -> str:
    base = metadata_base.rstrip("/")
    limit = aiohttp.ClientTimeout(total=limit_s)
    try:
        async with session.put(
            f"{base}/latest/api/token",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(METADATA_TOKEN_TTL_S)},
            timeout=limit,
        ) as response:
            if response.status != 200:
                raise MetadataError(f"PUT {base}/latest/api/token answered HTTP {response.status}")
            token = (await response.text()).strip()
        async with session.get(
            f"{base}/latest/meta-data/local-ipv4",
            headers={"X-aws-ec2-metadata-token": token},
            timeout=limit,
        ) as response:
            if response.status != 200:
                raise MetadataError(
                    f"GET {base}/latest/meta-data/local-ipv4 answered HTTP {response.status}"
                )
            text = (await response.text()).strip()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise MetadataError(
            f"instance-metadata service at {base} unreachable: {exc or type(exc).__name__}"
        ) from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise MetadataError(f"instance metadata gave {text[:60]!r}, not an IPv4 address") from None


async def resolve_external_url(
    url: str,
    metadata_base: str = DEFAULT_METADATA_BASE,
    *,
    session: aiohttp.ClientSession | None = None,
    limit_s: float = 2.0,
) -> str:
    """``url`` with a host of ``aws:metadata:local-ipv4`` replaced by this host's IPv4.

    The address comes from the EC2 instance-metadata service with the IMDSv2 flow
    (PUT a session token, then GET ``local-ipv4`` with it). Other URLs come back as they
    are. Raises :class:`MetadataError` when the service gives no address.
    """
    if AWS_LOCAL_IPV4_HOST not in url:
        return url
    if session is None:
        async with aiohttp.ClientSession() as own:
            address = await _local_ipv4(own, metadata_base, limit_s)
    else:
        address = await _local_ipv4(session, metadata_base, limit_s)
    return url.replace(AWS_LOCAL_IPV4_HOST, address)


# ==================================================================== agent
@dataclass
class BalancerLink:
    """The agent's connection to one balancer, as far as it knows."""

    address: str
    socket_url: str
    connected: bool = False
    connects: int = 0
    """Successful connections (a reconnect adds one)."""
    refusals: int = 0
    """Connections the balancer refused with 401 (wrong cluster token)."""
    failures: int = 0
    """Connection attempts that failed for any reason, refusals included."""
    snapshots_sent: int = 0
    last_error: str = ""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    host_header: str | None = None
    """The name the balancer was given by (``NAME:PORT``), sent as ``Host`` when the
    link dials one of its addresses."""
    server_name: str | None = None
    """That name without the port: over ``wss://``, the name the balancer's certificate
    is checked against (and sent as SNI), not the address dialed."""


class Agent:
    """Watches one llama-server and reports it to every balancer; see the module doc."""

    def __init__(self, options: AgentOptions) -> None:
        redact.add_secrets([options.cluster_token])
        self.options = options
        self.agent_id = uuid.uuid4().hex
        self.instance_id = options.instance_id
        self.local_url = options.local_llama_server.rstrip("/")
        self.url = (options.external_llama_server or options.local_llama_server).rstrip("/")
        """The URL reported to balancers; resolved at the start of :meth:`run`."""
        self.links = [BalancerLink(a, balancer_socket_url(a)) for a in options.balancers]
        """One per balancer: a balancer given by name has one per address of the name
        once it is looked up (see :meth:`_discover`)."""
        self._link_tasks: dict[str, asyncio.Task[None]] = {}
        """The running link of each socket URL."""
        self.instance: dict[str, Any] | None = None
        """The watched server as last read; None before the first read."""
        self.seq = 0
        """Sequence number of the last snapshot sent (to any balancer)."""
        self._stopping = asyncio.Event()
        self._first_reading = asyncio.Event()
        self.supervisor: SupervisorReport | None = None
        self._props: Reading | None = None
        self._props_at = 0.0
        self._props_health: int | None = None
        self._no_slots = False
        """llama-server answered /slots with 501 (``--no-slots``): poll /metrics instead
        until /props is read again."""
        self._poll_now = asyncio.Event()
        """What a local supervisor reports about the process, if one runs it."""

    # -------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Watch and report until :meth:`stop` is called or the task is cancelled.

        On the way out every connected balancer gets ``deregister``.
        """
        log.info(
            "agent starting agent=%s name=%s llama_server=%s balancers=%s",
            self.agent_id,
            self.options.name,
            self.local_url,
            ",".join(link.socket_url for link in self.links),
        )
        timeout = aiohttp.ClientTimeout(total=self.options.request_timeout)
        async with (
            aiohttp.ClientSession(
                timeout=timeout,
                connector=aiohttp.TCPConnector(
                    force_close=True,
                    ssl=self.options.upstream_tls if self.options.upstream_tls else True,
                ),
            ) as llama,
            aiohttp.ClientSession(
                # bounds the connect and the handshake; a live socket is watched by heartbeat
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=BALANCER_CONNECT_TIMEOUT_S,
                    sock_read=BALANCER_CONNECT_TIMEOUT_S,
                )
            ) as control,
        ):
            tasks: list[asyncio.Task[None]] = []
            try:
                if not await self._resolve_url(control):
                    return
                tasks.append(asyncio.create_task(self._poll_loop(llama), name="agent-poll"))
                named = any(_is_name(URL(link.socket_url).host or "") for link in self.links)
                if named:
                    await self._discover()
                for link in self.links:
                    self._start_link(control, link)
                if named:
                    tasks.append(
                        asyncio.create_task(self._discover_loop(control), name="agent-dns")
                    )
                await self._stopping.wait()
            finally:
                self._stopping.set()
                for link in self.links:
                    link.wake.set()
                # links send deregister and close; give them a bounded moment
                links = list(self._link_tasks.values())
                tasks += links
                if links:
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(
                            asyncio.shield(asyncio.gather(*links, return_exceptions=True)),
                            timeout=2.0,
                        )
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                log.info("agent stopped agent=%s", self.agent_id)

    def _start_link(self, session: aiohttp.ClientSession, link: BalancerLink) -> None:
        self._link_tasks[link.socket_url] = asyncio.create_task(
            self._link_loop(session, link), name="agent-link"
        )

    async def _discover(self) -> tuple[list[BalancerLink], list[BalancerLink]]:
        """Look up every balancer given by name; one link per address. Returns the links
        added and removed. A lookup that fails or finds nothing keeps what there is (at
        first: the name itself, which each connection attempt resolves)."""
        resolve = self.options.resolve or resolve_balancers
        wanted: list[BalancerLink] = []
        for address in self.options.balancers:
            url = URL(balancer_socket_url(address))
            host = url.host or ""
            current = [link for link in self.links if link.address == address]
            if not _is_name(host):
                wanted += current
                continue
            port = url.port or (443 if url.scheme == "wss" else 80)
            try:
                found = await resolve(host, port)
            except OSError as exc:
                log.warning("balancer lookup failed name=%s error=%s", host, exc)
                found = []
            if not found:
                wanted += current
                continue
            by_url = {link.socket_url: link for link in current}
            for ip in found:
                socket_url = str(url.with_host(ip))
                wanted.append(
                    by_url.get(socket_url)
                    or BalancerLink(
                        address, socket_url, host_header=f"{host}:{port}", server_name=host
                    )
                )
        # two names (or a name and an address) for one balancer: one link, or the agent
        # would register there twice and flap
        unique: dict[str, BalancerLink] = {}
        for link in wanted:
            unique.setdefault(link.socket_url, link)
        wanted = list(unique.values())
        kept = {id(link) for link in self.links} & {id(link) for link in wanted}
        added = [link for link in wanted if id(link) not in kept]
        removed = [link for link in self.links if id(link) not in kept]
        self.links = wanted
        for link in added:
            log.info("balancer address found name=%s url=%s", link.address, link.socket_url)
        for link in removed:
            log.info("balancer address gone name=%s url=%s", link.address, link.socket_url)
        return added, removed

    async def _discover_loop(self, session: aiohttp.ClientSession) -> None:
        """Look the balancers' names up again every ``balancer_dns_interval``: connect to
        addresses that appear, drop those that went."""
        while not self._stopping.is_set():
            await self._sleep_unless_stopping(self.options.balancer_dns_interval)
            if self._stopping.is_set():
                return
            added, removed = await self._discover()
            for link in removed:
                task = self._link_tasks.pop(link.socket_url, None)
                if task is not None:
                    task.cancel()  # the balancer sees the socket close: the agent left it
            for link in added:
                self._start_link(session, link)

    async def stop(self) -> None:
        """Ask :meth:`run` to deregister from every balancer and return."""
        self._stopping.set()
        self._poll_now.set()
        for link in self.links:
            link.wake.set()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _resolve_url(self, session: aiohttp.ClientSession) -> bool:
        """Resolve the reported URL, retrying with backoff; False when stopped first."""
        backoff = self.options.backoff_initial
        while not self._stopping.is_set():
            try:
                resolved = await resolve_external_url(
                    self.url,
                    self.options.metadata_base,
                    session=session,
                    limit_s=self.options.request_timeout,
                )
            except MetadataError as exc:
                log.error(
                    "cannot resolve external llama-server url=%s error=%s retry_in=%.1fs",
                    self.url,
                    exc,
                    backoff,
                )
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, self.options.backoff_max)
                continue
            if resolved != self.url:
                log.info("external llama-server url=%s resolved=%s", self.url, resolved)
            self.url = resolved
            return True
        return False

    # ---------------------------------------------------------------- polling
    async def _get(self, session: aiohttp.ClientSession, path: str, authorize: bool) -> Reading:
        headers: dict[str, str] = {}
        if authorize and self.options.llama_server_api_key:
            headers["Authorization"] = f"Bearer {self.options.llama_server_api_key}"
        try:
            async with session.get(self.local_url + path, headers=headers) as response:
                return Reading(status=response.status, body=await response.read())
        except TimeoutError:
            return Reading(error=f"timed out after {self.options.request_timeout:g} s")
        except aiohttp.ClientError as exc:
            return Reading(error=str(exc) or type(exc).__name__)

    async def read_instance(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Read llama-server once and return the snapshot instance."""
        if self.options.server_kind == "generic":
            return generic_instance(
                instance_id=self.instance_id,
                url=self.url,
                model=self.options.model_name or "",
                slots=self.options.slots,
                health=await self._get(session, self.options.health_path, authorize=True),
                health_path=self.options.health_path,
            )
        health = await self._get(session, "/health", authorize=False)
        props: Reading | None = None
        slots: Reading | None = None
        metrics: Reading | None = None
        source = self.options.slot_source
        if health.status is not None and source != "slots":
            # a server that may sleep: nothing that counts as activity (/slots); /props
            # every time, for is_sleeping
            props = await self._get(session, "/props", authorize=True)
            if source == "metrics":
                metrics = await self._get(session, "/metrics", authorize=True)
        elif health.status is not None:
            # /props (model, slot count, context) changes only when the server restarts:
            # re-read it after any change in health, an error, or every PROPS_REFRESH s
            now = time.monotonic()
            cached = self._props
            if (
                cached is None
                or cached.status != 200
                or health.status != self._props_health
                or now - self._props_at > PROPS_REFRESH
            ):
                props, slots = await asyncio.gather(
                    self._get(session, "/props", authorize=True),
                    self._get(session, "/slots", authorize=True),
                )
                self._props, self._props_at, self._props_health = props, now, health.status
            elif self._no_slots:
                props = cached  # --no-slots: /metrics, when on, tells the busy slots
                metrics = await self._get(session, "/metrics", authorize=True)
            else:
                props = cached
                slots = await self._get(session, "/slots", authorize=True)
            if slots is not None and slots.status is not None:
                self._no_slots = slots.status == 501
                if self._no_slots:
                    metrics = await self._get(session, "/metrics", authorize=True)
        return instance_from_readings(
            instance_id=self.instance_id,
            url=self.url,
            health=health,
            props=props,
            slots=slots,
            metrics=metrics,
            previous=self.instance,
            blind=source == "balancer",
        )

    async def _poll_loop(self, session: aiohttp.ClientSession) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                instance = await self.read_instance(session)
            except Exception:  # never let one odd answer end the agent
                log.exception("reading llama-server failed url=%s", self.local_url)
            else:
                self._update(instance)
            elapsed = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._poll_now.wait(), max(0.0, self.options.poll_interval - elapsed)
                )
            self._poll_now.clear()

    def _update(self, instance: dict[str, Any]) -> None:
        previous = self.instance
        self.instance = instance
        self._first_reading.set()
        if instance == previous:
            return
        before = {i["kind"] for i in (previous or {}).get("issues", [])}
        after = {i["kind"] for i in instance["issues"]}
        starting = self.supervisor is not None and self.supervisor.state == "starting"
        for issue in instance["issues"]:
            if issue["kind"] not in before:
                # a server its supervisor is still starting is expected not to answer
                (log.debug if starting else log.warning)(
                    "llama-server issue url=%s kind=%s message=%s",
                    self.local_url,
                    issue["kind"],
                    issue["message"],
                )
        for kind in before - after:
            log.info("llama-server issue cleared url=%s kind=%s", self.local_url, kind)
        log.debug(
            "instance changed state=%s busy=%s/%s",
            instance["state"],
            instance["busy"],
            instance["total_slots"],
        )
        for link in self.links:
            link.wake.set()

    # -------------------------------------------------------------- reporting
    def _snapshot(self) -> dict[str, Any]:
        self.seq += 1
        instances = [self._as_report(self.instance).to_wire()] if self.instance is not None else []
        return {"type": "snapshot", "seq": self.seq, "instances": instances}

    def set_supervisor_state(self, supervisor: SupervisorReport | None) -> None:
        """Attach what the local supervisor knows (state, restarts, last error) to the
        reported instance and report at once. A supervisor that says ``failed`` or
        ``starting`` overrides what ``/health`` alone would suggest."""
        self.supervisor = supervisor
        self._props = None  # the process may have restarted: read /props again
        self._poll_now.set()  # read the server at once: it may have just become ready
        for link in self.links:
            link.wake.set()

    def _as_report(self, instance: dict[str, Any]) -> InstanceReport:
        """The instance as this agent reports it: what the server answered (checked by
        the parser the balancer uses), its configured name and aliases, and its
        supervisor's view of the process."""
        report = InstanceReport.from_wire(instance)
        if not report.model and self.options.model_name:
            report = dataclasses.replace(report, model=self.options.model_name)
        if self.options.extra_aliases:
            known = {*report.aliases, report.model}
            added = tuple(a for a in self.options.extra_aliases if a not in known)
            report = dataclasses.replace(report, aliases=(*report.aliases, *added))
        supervisor = self.supervisor
        if supervisor is None:
            return report
        report = dataclasses.replace(report, supervisor=supervisor)
        # the supervisor knows the process: while it is not ready, its state wins over
        # what /health alone suggests (a refused connection during a restart is
        # "starting", not "failed")
        if supervisor.state in ("failed", "starting", "stopped"):
            report = dataclasses.replace(report, state=supervisor.state)
            if supervisor.state == "failed":
                failed = IssueReport("failed", str(supervisor.last_error or ""))
                report = dataclasses.replace(report, issues=(*report.issues, failed))
        return report

    async def _link_loop(self, session: aiohttp.ClientSession, link: BalancerLink) -> None:
        """Keep one balancer informed: connect, report, reconnect with backoff."""
        backoff = self.options.backoff_initial
        headers = {"Authorization": f"Bearer {self.options.cluster_token}"}
        secure = link.socket_url.startswith("wss://")
        if link.host_header is not None:
            headers["Host"] = link.host_header
        while not self._stopping.is_set():
            if self.options.tls_reload is not None and secure:
                self.options.tls_reload()
            try:
                async with session.ws_connect(
                    link.socket_url,
                    headers=headers,
                    ssl=self.options.tls if self.options.tls is not None else True,
                    server_hostname=link.server_name if secure else None,
                    heartbeat=BALANCER_HEARTBEAT_S,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    max_msg_size=4 * 1024 * 1024,
                ) as ws:
                    link.connected = True
                    link.connects += 1
                    link.last_error = ""
                    backoff = self.options.backoff_initial
                    log.info(
                        "connected to balancer balancer=%s agent=%s", link.socket_url, self.agent_id
                    )
                    await self._report(ws, link)
                    if self._stopping.is_set():
                        return
                    link.last_error = "balancer closed the connection"
                    log.warning(
                        "balancer connection lost balancer=%s close_code=%s",
                        link.socket_url,
                        ws.close_code,
                    )
            except aiohttp.WSServerHandshakeError as exc:
                link.failures += 1
                if exc.status in (401, 403):
                    link.refusals += 1
                    link.last_error = (
                        f"cluster token or client certificate refused (HTTP {exc.status})"
                    )
                    log.error(
                        "balancer refused the cluster token or client certificate balancer=%s "
                        "status=%s: check CORRAL_CLUSTER_TOKEN matches the balancer's, and "
                        "under its agent_auth certificate or both, that tls_client_cert is "
                        "issued by its tls_client_ca; retry_in=%.1fs",
                        link.socket_url,
                        exc.status,
                        backoff,
                    )
                else:
                    link.last_error = f"handshake failed (HTTP {exc.status})"
                    log.warning(
                        "balancer handshake failed balancer=%s status=%s retry_in=%.1fs",
                        link.socket_url,
                        exc.status,
                        backoff,
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                link.failures += 1
                link.last_error = str(exc) or type(exc).__name__
                if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                    link.last_error = (
                        f"the balancer's TLS certificate is not trusted "
                        f"({exc.certificate_error}): give its CA with --tls-ca (tls_ca)"
                    )
                log.warning(
                    "balancer unreachable balancer=%s error=%s retry_in=%.1fs",
                    link.socket_url,
                    link.last_error,
                    backoff,
                )
            finally:
                link.connected = False
            await self._sleep_unless_stopping(backoff)
            backoff = min(backoff * 2, self.options.backoff_max)

    async def _report(self, ws: aiohttp.ClientWebSocketResponse, link: BalancerLink) -> None:
        """Register, then send snapshots until the socket closes or the agent stops."""
        reader = asyncio.create_task(self._read(ws, link), name="agent-link-reader")
        try:
            await ws.send_json(
                {
                    "type": "register",
                    "agent_id": self.agent_id,
                    "name": self.options.name,
                    "version": __version__,
                }
            )
            while not (self._first_reading.is_set() or self._stopping.is_set() or reader.done()):
                await self._wait_wake(link, self.options.report_interval)
            while not reader.done():
                if self._stopping.is_set():
                    await ws.send_json({"type": "deregister"})
                    await ws.close()
                    log.info("deregistered balancer=%s agent=%s", link.socket_url, self.agent_id)
                    return
                link.wake.clear()
                await ws.send_json(self._snapshot())
                link.snapshots_sent += 1
                await self._wait_wake(link, self.options.report_interval)
        except ConnectionResetError:
            pass  # the socket closed under us: the caller reconnects
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _command(self, ws: aiohttp.ClientWebSocketResponse, data: dict[str, Any]) -> None:
        """Run a balancer's command through the local supervisor's handler and answer
        ``{"type": "command_result", "id", "ok", "detail", ...}``."""
        command = str(data.get("command", ""))
        handler = self.options.on_command
        result: dict[str, Any]
        if handler is None or data.get("instance") != self.instance_id:
            result = {"ok": False, "detail": "this agent does not run that instance's process"}
        else:
            try:
                result = await handler(command, data)
            except Exception as exc:  # a failing command must not end the connection
                log.exception("command failed command=%s", command)
                result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        log.info(
            "command command=%s ok=%s detail=%s",
            command,
            result.get("ok"),
            result.get("detail", ""),
        )
        with contextlib.suppress(ConnectionResetError):
            await ws.send_json({**result, "type": "command_result", "id": data.get("id")})

    async def _wait_wake(self, link: BalancerLink, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.wake.wait(), seconds)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, link: BalancerLink) -> None:
        """Read what the balancer says; wake the reporter when the socket ends."""
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                    kind = data.get("type")
                except (ValueError, AttributeError):
                    log.warning("balancer sent a bad message balancer=%s", link.socket_url)
                    continue
                if kind == "registered":
                    log.info(
                        "registered balancer=%s balancer_version=%s",
                        link.socket_url,
                        data.get("balancer_version"),
                    )
                elif kind == "command":
                    await self._command(ws, data)
                elif kind == "error":
                    log.warning(
                        "balancer reported an error balancer=%s message=%s",
                        link.socket_url,
                        data.get("message"),
                    )
                else:
                    log.debug(
                        "ignoring balancer message balancer=%s type=%s", link.socket_url, kind
                    )
        finally:
            link.wake.set()


async def run_agent(options: AgentOptions) -> None:
    """Run an agent until cancelled (signal handling is the caller's)."""
    await Agent(options).run()
