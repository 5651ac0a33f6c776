"""OpenTelemetry traces: one per request, and the server starts requests wait for.

Off unless the standard ``OTEL_*`` variables ask for it (:func:`wanted`): an OTLP
endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
or an exporter (``OTEL_TRACES_EXPORTER=otlp`` or ``console``); ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` keeps it off. Off, the gateway holds
:data:`NO_TRACE`, whose every method does nothing, and no OpenTelemetry module is
imported. On, the official SDK exports in batches from its own thread over OTLP:
HTTP/protobuf by default, gRPC with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` where
``opentelemetry-exporter-otlp-proto-grpc`` is installed. The SDK reads the rest of the
standard variables itself: headers, timeouts, compression, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``.

A request's trace (:class:`RequestTrace`), under the client's W3C ``traceparent``
when it sent one::

    POST /v1/chat/completions            SERVER  the whole exchange; gen_ai.* and corral.*
    ├── corral.buffer_wait               INTERNAL  waiting for a slot (only when it waited),
    │                                              linked to the server starts it waited for
    ├── corral.placement                 INTERNAL  policy, reason, instance, slot
    ├── chat MODEL                       CLIENT    one per try, its traceparent sent upstream
    │   ├── corral.upstream.connect      INTERNAL  request sent -> response head
    │   ├── corral.first_token           INTERNAL  response head -> first body bytes
    │   └── corral.relay                 INTERNAL  first bytes -> last byte to the client
    ├── corral.buffer_wait / corral.placement / chat MODEL   (a retry: the same again)

Server starts (:class:`StartTraces`) are spans of their own traces: ``corral.model.load``
from a model host taking a load up until it serves (``corral serve``), and
``corral.instance.start`` from an instance leaving ready (a crash, a restart, a new
configuration) or appearing until it is ready again, as the agents report it. A buffer
wait links every start of its model that overlapped it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from corral import __version__
from corral.fleet.state import InstanceState

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Span, Tracer

    from corral.scheduling.scheduler import Lease, Scheduler

log = logging.getLogger(__name__)

#: The request routes' GenAI operation names (``gen_ai.operation.name``).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/completions": "text_completion",
    "/completions": "text_completion",
    "/completion": "text_completion",
    "/infill": "text_completion",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
    "/embedding": "embeddings",
}

#: How many finished server starts are kept for linking (per process, all models).
KEPT_STARTS = 256


class TracingError(RuntimeError):
    """The ``OTEL_*`` variables ask for something corral cannot do; the message says what."""


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables turn traces on (see the module doc)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    if exporters:
        return exporters != ["none"]
    endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    return any(environ.get(name) for name in endpoints)


def _exporters(environ: Mapping[str, str]) -> list[str]:
    value = environ.get("OTEL_TRACES_EXPORTER", "")
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def from_environment(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """A :class:`Tracing` when the variables turn traces on, else None."""
    environ = os.environ if environ is None else environ
    if not wanted(environ):
        return None
    return Tracing(service_name, environ)


class Tracing:
    """The SDK's tracer provider with corral's exporters, and the server starts."""

    def __init__(self, service_name: str, environ: Mapping[str, str]) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes: dict[str, str] = {"service.version": __version__}
        named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        if not named:  # the variables name the service when they say; corral otherwise
            attributes["service.name"] = service_name
        self.provider: TracerProvider = TracerProvider(resource=Resource.create(attributes))
        exporters = _exporters(environ) or ["otlp"]
        for name in exporters:
            if name == "none":
                continue
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
        self.tracer: Tracer = self.provider.get_tracer("corral", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.starts = StartTraces(self)
        self.described = ", ".join(exporters)
        log.info(
            "traces on: exporter=%s service=%s",
            self.described,
            self.provider.resource.attributes.get("service.name"),
        )

    def request(self, request: web.Request, route: str, request_id: str) -> RequestTrace:
        """A request's trace, its server span begun now (under the client's ``traceparent``)."""
        return RequestTrace(self, request, route, request_id)

    def watch(self, scheduler: Scheduler) -> None:
        """Trace the server starts the scheduler's events tell of."""
        self.starts.scheduler = scheduler
        scheduler.listeners.append(self.starts.on_event)

    def shutdown(self) -> None:
        """Export what is left and stop the exporters (blocks: run it in a thread)."""
        self.provider.shutdown()


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={name!r} is not supported: corral exports with otlp "
            "(the default) or console"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise TracingError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: pip install "
                "opentelemetry-exporter-otlp-proto-grpc (or use http/protobuf, the default)"
            ) from None
        return GrpcExporter()
    raise TracingError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf "
        "(the default) or grpc"
    )


class NullTrace:
    """What a request holds with traces off: every step is a no-op."""

    __slots__ = ()

    def waiting(self) -> None:
        pass

    def granted(self, lease: Lease, policy: str) -> None:
        pass

    def sending(self, headers: dict[str, str]) -> dict[str, str]:
        return headers

    def answered(self) -> None:
        pass

    def first_bytes(self) -> None:
        pass

    def failed(self, error: str) -> None:
        pass

    def finish(
        self,
        *,
        model: str,
        status: int,
        instance: str,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_tokens: int | None,
    ) -> None:
        pass


NO_TRACE = NullTrace()


class RequestTrace(NullTrace):
    """One request's spans (the tree in the module doc), built as the request goes.

    Steps are marked with wall-clock nanoseconds as they happen; the short spans are
    made with those times when their step ends, so a request holds at most its server
    span and the current try's span open.
    """

    __slots__ = (
        "_answered_at",
        "_first_at",
        "_sent_at",
        "_try",
        "_wait_began",
        "context",
        "model",
        "operation",
        "server",
        "tracing",
        "tries",
    )

    def __init__(self, tracing: Tracing, request: web.Request, route: str, request_id: str) -> None:
        from opentelemetry import trace

        self.tracing = tracing
        parent = tracing.propagator.extract(request.headers)
        operation = OPERATIONS.get(request.path)
        self.operation = operation
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
            "corral.request_id": request_id,
        }
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        self.server: Span = tracing.tracer.start_span(
            # HTTP's convention: the method and the route, or the method alone
            request.method if route == "other" else f"{request.method} {route}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )
        self.context = trace.set_span_in_context(self.server)
        self.model = ""
        self.tries = 0
        self._try: Span | None = None
        self._wait_began = self._sent_at = self._answered_at = self._first_at = 0

    def _span(self, name: str, start: int, end: int, attributes: dict[str, Any], **kw: Any) -> None:
        """A finished child span from ``start`` to ``end`` (ns), under the current try
        when there is one, else under the server span."""
        from opentelemetry import trace

        parent = trace.set_span_in_context(self._try) if self._try is not None else self.context
        span = self.tracing.tracer.start_span(
            name, context=parent, start_time=start, attributes=attributes, **kw
        )
        span.end(end_time=end)

    def waiting(self) -> None:
        self._wait_began = time.time_ns()

    def granted(self, lease: Lease, policy: str) -> None:
        now = time.time_ns()
        self.model = lease.model
        if lease.waited > 0:
            began = self._wait_began or now - int(lease.waited * 1e9)
            self._span(
                "corral.buffer_wait",
                began,
                now,
                {"corral.model": lease.model, "corral.waited_seconds": lease.waited},
                links=self.tracing.starts.links(lease.model, began, now),
            )
        placed: dict[str, Any] = {
            "corral.policy": policy,
            "corral.instance": lease.instance.id,
            "corral.instance.url": lease.instance.url,
        }
        if lease.reason is not None:
            placed["corral.placement.reason"] = lease.reason
        if lease.slot is not None:
            placed["corral.slot"] = lease.slot
        self._span("corral.placement", now, now, placed)

    def sending(self, headers: dict[str, str]) -> dict[str, str]:
        """Begin a try (a CLIENT span); return ``headers`` with its ``traceparent``."""
        from opentelemetry import trace

        self.tries += 1
        self._sent_at = time.time_ns()
        self._answered_at = self._first_at = 0
        name = f"{self.operation or 'http'} {self.model}".strip()
        self._try = self.tracing.tracer.start_span(
            name,
            context=self.context,
            kind=trace.SpanKind.CLIENT,
            start_time=self._sent_at,
            attributes={"corral.try": self.tries, "gen_ai.request.model": self.model},
        )
        sent = dict(headers)
        self.tracing.propagator.inject(sent, context=trace.set_span_in_context(self._try))
        return sent

    def answered(self) -> None:
        self._answered_at = time.time_ns()
        self._span("corral.upstream.connect", self._sent_at, self._answered_at, {})

    def first_bytes(self) -> None:
        self._first_at = time.time_ns()
        if self._answered_at:
            self._span("corral.first_token", self._answered_at, self._first_at, {})

    def failed(self, error: str) -> None:
        """The try failed before its first byte reached the client (it may be retried)."""
        from opentelemetry.trace import Status, StatusCode

        if self._try is None:
            return
        self._try.set_attribute("error.type", "upstream_failed")
        self._try.set_status(Status(StatusCode.ERROR, error))
        self._try.end()
        self._try = None

    def finish(
        self,
        *,
        model: str,
        status: int,
        instance: str,
        input_tokens: int | None,
        output_tokens: int | None,
        cached_tokens: int | None,
    ) -> None:
        from opentelemetry.trace import Status, StatusCode

        now = time.time_ns()
        if self._try is not None:
            if self._first_at:
                self._span("corral.relay", self._first_at, now, {})
            self._try.set_attribute("http.response.status_code", status)
            if status >= 500:
                self._try.set_status(Status(StatusCode.ERROR))
            self._try.end(end_time=now)
            self._try = None
        server = self.server
        attributes: dict[str, Any] = {
            "http.response.status_code": status,
            "corral.retries": max(0, self.tries - 1),
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if instance:
            attributes["corral.instance"] = instance
        if input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = input_tokens
        if output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = output_tokens
        if cached_tokens is not None:
            attributes["corral.usage.cached_tokens"] = cached_tokens
        server.set_attributes(attributes)
        if status >= 500:
            server.set_status(Status(StatusCode.ERROR))
        server.end(end_time=now)


class StartTraces:
    """Spans for the server starts requests wait for (see the module doc), from the
    scheduler's events: the model host's ``loading``/``loaded``/``load_failed`` and the
    fleet changes the agents report."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.scheduler: Scheduler | None = None
        self.open: dict[str, tuple[Span, str, int]] = {}
        """Starts under way: by ``model:KEY`` or ``instance:ID``, the span, its model and
        its start (ns)."""
        self.done: deque[tuple[str, int, int, Span]] = deque(maxlen=KEPT_STARTS)
        """Finished starts: model, start, end (ns), span."""
        self.states: dict[str, InstanceState] = {}

    def links(self, model: str, began: int, ended: int) -> list[Link]:
        """Links to every start of ``model`` that overlapped ``began``..``ended``."""
        from opentelemetry.trace import Link

        found = [
            Link(span.get_span_context())
            for start_model, start, end, span in self.done
            if start_model == model and start <= ended and end >= began
        ]
        found += [
            Link(span.get_span_context())
            for span, start_model, start in self.open.values()
            if start_model == model and start <= ended
        ]
        return found

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "model":
            key = str(event.get("model", ""))
            what = event.get("event")
            if what == "loading":
                self._begin(f"model:{key}", "corral.model.load", key, {"corral.model": key})
            elif what == "loaded":
                self._end(
                    f"model:{key}",
                    None,
                    {"corral.evicted": int(event.get("evicted", 0))},
                )
            elif what == "load_failed":
                self._end(f"model:{key}", "the load failed", {})
        elif kind == "fleet":
            self._scan()

    def _scan(self) -> None:
        """Instances that left ready or appeared begin a start; ready ends it."""
        if self.scheduler is None:
            return
        instances = self.scheduler.fleet.instances
        for instance_id, instance in instances.items():
            before = self.states.get(instance_id)
            state = instance.state
            if state is before:
                continue
            self.states[instance_id] = state
            key = f"instance:{instance_id}"
            if state is InstanceState.READY:
                self._end(key, None, {})
            elif state is InstanceState.FAILED:
                self._end(key, "the server failed", {})
            elif state is InstanceState.STARTING and key not in self.open:
                if before is None and f"model:{instance.model}" in self.open:
                    continue  # the model host's own load: its span tells it
                attributes: dict[str, Any] = {
                    "corral.instance": instance_id,
                    "corral.model": instance.model,
                    "corral.restart": before is not None,
                }
                if instance.supervisor is not None:
                    attributes["corral.restarts"] = instance.supervisor.restarts
                self._begin(key, "corral.instance.start", instance.model, attributes)
        for gone in [i for i in self.states if i not in instances]:
            del self.states[gone]
            self._end(f"instance:{gone}", "the instance left the fleet", {})

    def _begin(self, key: str, name: str, model: str, attributes: dict[str, Any]) -> None:
        if key in self.open:
            return
        now = time.time_ns()
        span = self.tracing.tracer.start_span(name, start_time=now, attributes=attributes)
        self.open[key] = (span, model, now)

    def _end(self, key: str, error: str | None, attributes: dict[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        opened = self.open.pop(key, None)
        if opened is None:
            return
        span, model, began = opened
        now = time.time_ns()
        span.set_attributes(attributes)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=now)
        self.done.append((model, began, now, span))
