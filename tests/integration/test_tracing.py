"""Traces end to end: an OTLP/HTTP receiver on loopback gets what a balancer exports,
decoded with ``opentelemetry-proto``, for a streamed request that failed once on one
instance, waited in the buffer for another and was served there."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from corral.observe import tracing
from corral.testing.fake_llama_server import SERVER_KEY, FakeLlamaServer
from tests.support.fleet import CHAT, Fleet, start_fleet
from tests.support.local_serve import complete, pid_of, serving
from tests.support.waiting import wait_for

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass
class Got:
    span: Span
    service: str

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kv in self.span.attributes:
            which = kv.value.WhichOneof("value")
            out[kv.key] = getattr(kv.value, which) if which else None
        return out

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent(self) -> str:
        return self.span.parent_span_id.hex()


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with protobuf bodies."""

    def __init__(self) -> None:
        self.spans: list[Got] = []
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.server = TestServer(app)

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(
                kv.value.string_value
                for kv in resource_spans.resource.attributes
                if kv.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend(Got(span, service) for span in scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[Got]:
        return sorted(
            (s for s in self.spans if s.name == name), key=lambda s: s.span.start_time_unix_nano
        )


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.server.start_server()
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", str(receiver.server.make_url("/v1/traces"))
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    try:
        yield receiver
    finally:
        await receiver.server.close()


def fake_of(server: TestServer) -> FakeLlamaServer:
    return server.app[SERVER_KEY]


async def test_a_retried_buffered_stream_is_one_trace_with_its_steps(receiver: Receiver) -> None:
    fleet: Fleet = await start_fleet(buffered_request_timeout=10.0)
    try:
        assert fleet.balancer.tracing is not None
        good = await fleet.add_fake(model="m", slots=1, token_delay=0.05, tokens=8)
        busy = asyncio.create_task(fleet.chat("m"))  # holds good's only slot a while
        await wait_for(
            lambda: fleet.balancer.scheduler.fleet.pool("m")[0].in_flight == 1, "the first"
        )
        bad = fake_of(await fleet.add_unwatched_fake("m", slots=4))
        bad.started_at = float("inf")  # "Loading model": 503 before the first byte
        assert fleet.http is not None
        async with fleet.http.post(
            fleet.base + "/v1/chat/completions",
            json={**CHAT, "model": "m", "stream": True},
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        ) as response:
            assert response.status == 200
            body = await response.read()
        assert b"data: [DONE]" in body
        assert (await busy)[0] == 200
        good_id = next(i for i in fleet.balancer.scheduler.fleet.instances if "manual" not in i)
    finally:
        await fleet.close()  # the balancer's stop flushes its spans

    (server,) = [s for s in receiver.spans if s.span.trace_id.hex() == CLIENT_TRACE
                 and s.parent == CLIENT_SPAN]  # fmt: skip
    assert server.name == "POST /v1/chat/completions"
    assert server.service == "corral-balancer"
    assert server.span.kind == Span.SPAN_KIND_SERVER
    attributes = server.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "m"
    assert attributes["http.response.status_code"] == 200
    assert attributes["corral.retries"] == 1
    assert attributes["corral.instance"] == good_id
    assert attributes["gen_ai.usage.output_tokens"] == 8
    assert attributes["gen_ai.usage.input_tokens"] > 0

    mine = [s for s in receiver.spans if s.span.trace_id.hex() == CLIENT_TRACE]
    children = sorted(
        (s for s in mine if s.parent == server.span_id), key=lambda s: s.span.start_time_unix_nano
    )
    first_try, second_try = [s for s in children if s.span.kind == Span.SPAN_KIND_CLIENT]
    placements = [s for s in children if s.name == "corral.placement"]
    (waited,) = [s for s in children if s.name == "corral.buffer_wait"]
    assert [p.attributes["corral.instance"] for p in placements] == ["manual-1/0", good_id]
    assert all(p.attributes["corral.policy"] for p in placements)
    # the order of the steps: placed, tried, failed; waited, placed, tried
    assert placements[0].span.start_time_unix_nano <= first_try.span.start_time_unix_nano
    assert first_try.span.end_time_unix_nano <= waited.span.end_time_unix_nano
    assert waited.span.end_time_unix_nano <= second_try.span.start_time_unix_nano
    assert waited.attributes["corral.waited_seconds"] > 0
    assert first_try.name == second_try.name == "chat m"
    assert first_try.span.status.code == Status.STATUS_CODE_ERROR
    assert "503" in first_try.span.status.message
    assert first_try.attributes["corral.try"] == 1 and second_try.attributes["corral.try"] == 2
    assert second_try.span.status.code != Status.STATUS_CODE_ERROR
    assert second_try.attributes["http.response.status_code"] == 200
    steps = sorted(
        (s for s in mine if s.parent == second_try.span_id),
        key=lambda s: s.span.start_time_unix_nano,
    )
    assert [s.name for s in steps] == [
        "corral.upstream.connect", "corral.first_token", "corral.relay"
    ]  # fmt: skip
    for before, after in itertools.pairwise(steps):
        assert before.span.end_time_unix_nano <= after.span.start_time_unix_nano
    assert steps[-1].span.end_time_unix_nano <= server.span.end_time_unix_nano

    # the instance got the second try's context: its work joins the client's trace
    sent = [h for h in good.fake.request_headers if CLIENT_TRACE in h.get("traceparent", "")]
    assert len(sent) == 1
    assert sent[0]["traceparent"] == f"00-{CLIENT_TRACE}-{second_try.span_id}-01"


def test_traces_are_off_unless_the_standard_variables_ask() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert tracing.from_environment("corral-balancer", {}) is None


def test_unsupported_exporters_and_protocols_are_clear_errors() -> None:
    with pytest.raises(tracing.TracingError, match="zipkin"):
        tracing.Tracing("s", {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(tracing.TracingError, match="http/json"):
        tracing.Tracing(
            "s", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


async def test_requests_that_wait_for_a_load_or_a_restart_link_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    async with serving(tmp_path, monkeypatch, {"a": {}}, buffered_request_timeout=30) as (
        local,
        base,
        http,
    ):
        assert local.balancer.tracing is not None
        # the first request starts the model and waits for it
        status, _ = await complete(http, base, "a")
        assert status == 200
        # a crash: a request sent while it restarts waits for the new server
        pid = pid_of(local, "a")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pool = local.balancer.scheduler.fleet.pool
        await wait_for(lambda: pool("a")[0].state != "ready", "the crash to be seen")
        status, _ = await complete(http, base, "a")
        assert status == 200
    assert all(s.service == "corral-serve" for s in receiver.spans)
    (load,) = receiver.named("corral.model.load")
    assert load.attributes["corral.model"] == "a"
    assert load.span.status.code != Status.STATUS_CODE_ERROR
    (restart,) = receiver.named("corral.instance.start")
    assert restart.attributes["corral.restart"] is True
    assert restart.attributes["corral.model"] == "a"
    assert restart.span.start_time_unix_nano >= load.span.end_time_unix_nano
    first_wait, second_wait = receiver.named("corral.buffer_wait")
    assert [link.span_id.hex() for link in first_wait.span.links] == [load.span_id]
    assert [link.span_id.hex() for link in second_wait.span.links] == [restart.span_id]
    # the starts are traces of their own; each wait sits in its request's trace
    assert load.parent == "" and restart.parent == ""
    servers = {s.span_id: s for s in receiver.named("POST /v1/chat/completions")}
    assert first_wait.parent in servers and second_wait.parent in servers


async def test_traces_go_over_grpc_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc, with the gRPC exporter installed (the test
    extra has it): the same spans reach a gRPC TraceService on loopback."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    got: list[Span] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
            for resource_spans in request.resource_spans:
                for scope in resource_spans.scope_spans:
                    got.extend(scope.spans)
            return ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    try:
        fleet = await start_fleet()
        try:
            await fleet.add_fake(model="m", slots=1)
            assert (await fleet.chat("m"))[0] == 200
        finally:
            await fleet.close()  # flushes
        names = {span.name for span in got}
        assert {"POST /v1/chat/completions", "corral.placement", "chat m"} <= names
    finally:
        await server.stop(None)
