"""What the agent makes of llama-server's answers, and of its own options; no I/O."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from corral.agent import (
    Agent,
    AgentOptions,
    Reading,
    balancer_socket_url,
    instance_from_readings,
    model_name_from_props,
)
from corral.protocol import InstanceReport, IssueReport, ProtocolError, SupervisorReport
from corral.supervisor.flags import sleeps

URL = "http://10.0.0.5:8080"
PROPS: dict[str, Any] = {
    "default_generation_settings": {"params": {}, "n_ctx": 1024},
    "total_slots": 4,
    "model_alias": "qwen",
    "model_path": "/models/qwen2.5-0.5b-q4_k_m.gguf",
}
SLOTS = [{"id": i, "is_processing": i < 3} for i in range(4)]
HEALTH_OK = Reading.ok({"status": "ok"})
LOADING = Reading(
    status=503,
    body=b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
)


def read(
    health: Reading = HEALTH_OK,
    props: Reading | None = None,
    slots: Reading | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return instance_from_readings(
        instance_id="0",
        url=URL,
        health=health,
        props=Reading.ok(PROPS) if props is None else props,
        slots=Reading.ok(SLOTS) if slots is None else slots,
        previous=previous,
    )


def kinds(instance: dict[str, Any]) -> list[str]:
    return [i["kind"] for i in instance["issues"]]


def test_healthy_readings_make_a_ready_instance_with_busy_slots() -> None:
    assert read() == {
        "id": "0",
        "url": URL,
        "model": "qwen",
        "aliases": [],
        "state": "ready",
        "total_slots": 4,
        "busy": 3,
        "n_ctx": 1024,
        "slot_source": "slots",
        "sleeping": False,
        "issues": [],
    }


@pytest.mark.parametrize(
    ("alias", "path", "model", "aliases"),
    [
        ("qwen", "/m/qwen2.5.gguf", "qwen", []),
        ("tiny.gguf", "/m/tiny.gguf", "tiny", ["tiny.gguf"]),  # no --alias: the file name
        ("", "/m/tiny.Q4_K_M.gguf", "tiny.Q4_K_M", ["tiny.Q4_K_M.gguf"]),
        ("big-00001-of-00003.gguf", "/m/big-00001-of-00003.gguf", "big",
         ["big-00001-of-00003.gguf"]),
        ("fake-model", "fake-model", "fake-model", []),
        ("w.gguf", "C:\\models\\w.gguf", "w", ["w.gguf"]),
    ],
)  # fmt: skip
def test_model_name_is_the_alias_else_the_file_stem(
    alias: str, path: str, model: str, aliases: list[str]
) -> None:
    assert model_name_from_props(alias, path) == (model, aliases)


@pytest.mark.parametrize(
    ("reading", "kind"),
    [
        (Reading(error="Cannot connect to host"), "unreachable"),
        (Reading(status=401, body=b'{"error":{"message":"Invalid API Key"}}'), "unauthorized"),
        (Reading(status=403, body=b""), "unauthorized"),
        (Reading(status=500, body=b'{"error":{"message":"boom"}}'), "server_error"),
        (Reading(status=503, body=b"overloaded"), "server_error"),
        (LOADING, "loading"),
        (Reading(status=200, body=b"{nope"), "bad_response"),
        (Reading.ok(["not", "props"]), "bad_response"),
        (Reading.ok({**PROPS, "total_slots": "4"}), "bad_response"),
        (Reading.ok({**PROPS, "default_generation_settings": None}), "bad_response"),
        (Reading.ok({**PROPS, "model_alias": "", "model_path": ""}), "bad_response"),
        (Reading(status=404, body=b"File Not Found"), "bad_response"),
    ],
)
def test_props_failures_become_typed_issues(reading: Reading, kind: str) -> None:
    assert kinds(read(props=reading)) == [kind]


def test_a_no_slots_server_is_served_with_busy_slots_from_metrics_or_none_seen() -> None:
    disabled = Reading(status=501, body=b'{"error":{"message":"not supported"}}')
    blind = read(slots=disabled)
    assert kinds(blind) == [] and blind["state"] == "ready"
    assert (blind["slot_source"], blind["busy"], blind["total_slots"]) == ("balancer", 0, 4)
    metrics = Reading(
        status=200,
        body=b"# HELP llamacpp:requests_processing Number of requests processing.\n"
        b"# TYPE llamacpp:requests_processing gauge\n"
        b"llamacpp:requests_processing 3\nllamacpp:requests_deferred 1\n",
    )
    seen = instance_from_readings(
        instance_id="0", url=URL, health=HEALTH_OK, props=Reading.ok(PROPS), slots=disabled,
        metrics=metrics,
    )  # fmt: skip
    assert (seen["slot_source"], seen["busy"], kinds(seen)) == ("metrics", 3, [])
    later = instance_from_readings(
        instance_id="0",
        url=URL,
        health=HEALTH_OK,
        props=Reading.ok(PROPS),
        slots=None,
        metrics=Reading(status=501, body=b"{}"),
        previous=seen,
    )  # fmt: skip: --metrics gone after a restart: nothing seen, nothing guessed
    assert (later["slot_source"], later["busy"]) == ("balancer", 0)
    assert read()["slot_source"] == "slots"


def test_malformed_slots_is_a_bad_response() -> None:
    assert kinds(read(slots=Reading.ok([{"id": 0}]))) == ["bad_response"]
    assert kinds(read(slots=Reading.ok({"is_processing": True}))) == ["bad_response"]


def test_unreachable_server_fails_and_keeps_what_was_known() -> None:
    known = read()
    down = instance_from_readings(
        instance_id="0",
        url=URL,
        health=Reading(error="Connection refused"),
        props=None,
        slots=None,
        previous=known,
    )
    assert down["state"] == "failed"
    assert kinds(down) == ["unreachable"]
    assert "Connection refused" in down["issues"][0]["message"]
    assert (down["model"], down["total_slots"], down["n_ctx"]) == ("qwen", 4, 1024)


def test_loading_on_every_path_is_one_issue_and_starting() -> None:
    instance = read(health=LOADING, props=LOADING, slots=LOADING)
    assert instance["state"] == "starting"
    assert kinds(instance) == ["loading"]
    assert instance["model"] == ""


def test_busy_never_exceeds_total_slots() -> None:
    instance = read(slots=Reading.ok([{"is_processing": True}] * 6))
    assert instance["busy"] == 4


def test_issue_messages_are_bounded() -> None:
    huge = json.dumps({"error": {"message": "x" * 10_000}}).encode()
    (issue,) = read(props=Reading(status=500, body=huge))["issues"]
    assert len(issue["message"]) < 500


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("127.0.0.1:8085", "ws://127.0.0.1:8085/api/v1/agents/socket"),
        ("http://b1:8085", "ws://b1:8085/api/v1/agents/socket"),
        ("https://b1.example/", "wss://b1.example/api/v1/agents/socket"),
        ("ws://b1:9/custom/path", "ws://b1:9/custom/path"),
    ],
)
def test_balancer_addresses_become_agent_socket_urls(address: str, url: str) -> None:
    assert balancer_socket_url(address) == url


@pytest.mark.parametrize("address", ["", "ftp://b1:21", "http://"])
def test_bad_balancer_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="balancer address"):
        balancer_socket_url(address)


def test_options_name_the_field_in_error() -> None:
    base: dict[str, Any] = {
        "local_llama_server": "http://127.0.0.1:8080",
        "balancers": ["127.0.0.1:8085"],
        "cluster_token": "t",
    }
    AgentOptions(**base)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"balancers": []}, "balancers"),
        ({"cluster_token": ""}, "cluster_token"),
        ({"local_llama_server": "127.0.0.1:8080"}, "local_llama_server"),
        ({"report_interval": 2.0}, "report_interval"),
        ({"poll_interval": 0}, "poll_interval"),
    ]
    for change, field_name in changes:
        with pytest.raises(ValueError, match=field_name):
            AgentOptions(**{**base, **change})


def test_a_sleeping_server_stays_ready_and_says_so() -> None:
    asleep = read(props=Reading.ok({**PROPS, "is_sleeping": True}))
    assert (asleep["state"], asleep["sleeping"], kinds(asleep)) == ("ready", True, [])
    assert read(props=Reading.ok({**PROPS, "is_sleeping": False}))["sleeping"] is False


def test_blind_reads_no_busy_slots() -> None:
    seen = instance_from_readings(
        instance_id="0", url=URL, health=HEALTH_OK, props=Reading.ok(PROPS), slots=None,
        blind=True,
    )  # fmt: skip
    assert (seen["slot_source"], seen["busy"], seen["total_slots"]) == ("balancer", 0, 4)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--sleep-idle-seconds", "30"], {}, True),
        (["--sleep-idle-seconds=0"], {}, True),
        (["--sleep-idle-seconds", "-1"], {}, False),
        ([], {"LLAMA_ARG_SLEEP_IDLE_SECONDS": "5"}, True),
        (["--sleep-idle-seconds", "-1"], {"LLAMA_ARG_SLEEP_IDLE_SECONDS": "5"}, False),
        (["--parallel", "2"], {}, False),
    ],
)
def test_sleeps_reads_llama_server_arguments_as_llama_server_does(
    args: list[str], env: dict[str, str], expected: bool
) -> None:
    assert sleeps(args, env) is expected


def test_what_the_agent_writes_is_what_the_balancer_reads() -> None:
    """The agent's snapshot instance parses as the protocol's InstanceReport, every
    field kept; a malformed one is a ProtocolError naming the field."""
    written = read(props=Reading.ok({**PROPS, "is_sleeping": True}))
    report = InstanceReport.from_wire(written)
    assert (report.id, report.url, report.model, report.total_slots, report.busy) == (
        written["id"], written["url"], written["model"], written["total_slots"],
        written["busy"],
    )  # fmt: skip
    assert (report.n_ctx, report.slot_source, report.sleeping) == (1024, "slots", True)
    assert set(written) <= {f.name for f in dataclasses.fields(InstanceReport)}
    for bad, field in (({"url": "u"}, "id"), ({**written, "busy": -1}, "busy")):
        with pytest.raises(ProtocolError, match=f"`{field}`"):
            InstanceReport.from_wire(bad)


def test_a_report_and_its_supervisor_survive_the_wire_unchanged() -> None:
    """to_wire and from_wire are inverses, supervisor included; a malformed supervisor
    is a ProtocolError naming its field."""
    supervisor = SupervisorReport(
        state="ready",
        pid=4321,
        restarts=2,
        launches=3,
        failed_runs=1,
        readies=3,
        startup_seconds=(0.5, 0.25),
        last_exit_code=-9,
        last_error="killed",
        ready_since=1.5,
        log_tail=("a line", "another"),
    )
    report = InstanceReport(
        id="a/0",
        url="http://127.0.0.1:1",
        model="m",
        aliases=("x",),
        state="ready",
        total_slots=4,
        busy=1,
        n_ctx=2048,
        slot_source="metrics",
        issues=(IssueReport("slow", "a message"),),
        supervisor=supervisor,
    )
    wire = json.loads(json.dumps(report.to_wire()))  # as it crosses the socket
    assert InstanceReport.from_wire(wire) == report
    for bad, field in (
        ({"pid": "12"}, "pid"),
        ({"startup_seconds": [1, "x"]}, "startup_seconds"),
        ({"restarts": -1}, "restarts"),
        ({"log_tail": "one line"}, "log_tail"),
    ):
        with pytest.raises(ProtocolError, match=f"`{field}`"):
            SupervisorReport.from_wire({**supervisor.to_wire(), **bad})


async def test_two_names_for_one_balancer_make_one_link() -> None:
    """An address two names share (or a name and an address given as is) is one
    balancer: two links would register the agent twice and flap."""

    async def resolve(host: str, port: int) -> list[str]:
        return {"a.test": ["10.0.0.1", "10.0.0.2"], "b.test": ["10.0.0.2"]}[host]

    agent = Agent(
        AgentOptions(
            local_llama_server="http://127.0.0.1:1",
            balancers=["a.test:9", "b.test:9", "10.0.0.1:9"],
            cluster_token="t",
            resolve=resolve,
        )
    )
    added, removed = await agent._discover()
    assert sorted(link.socket_url for link in agent.links) == [
        "ws://10.0.0.1:9/api/v1/agents/socket",
        "ws://10.0.0.2:9/api/v1/agents/socket",
    ]
    assert {link.host_header for link in agent.links} == {"a.test:9"}
    assert len(added) == 2 and len(removed) == 3  # the names, and the address a.test has
