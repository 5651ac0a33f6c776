"""Where an agent-owned llama-server listens and the address balancers are given,
through a port move (reconfigure with ``port``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.supervisor.managed import ManagedInstance, ManagedOptions


def instance(tmp_path: Path, **options: object) -> ManagedInstance:
    binary = tmp_path / "llama-server"
    binary.write_text("")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return ManagedInstance(
        ManagedOptions(
            binary=binary, model=model, port=18081, balancers=["127.0.0.1:1"],
            cluster_token="t", **options,  # type: ignore[arg-type]
        )
    )  # fmt: skip


def host_of(args: list[str]) -> str:
    return args[args.index("--host") + 1]


def test_loopback_by_default(tmp_path: Path) -> None:
    made = instance(tmp_path)
    assert host_of(made.supervisor.args) == "127.0.0.1"
    assert made.agent.local_url == made.agent.url == "http://127.0.0.1:18081"


def test_every_address_is_polled_on_loopback_and_reported_at_the_external_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path))
    made = instance(tmp_path, host="0.0.0.0", external_url="http://10.0.0.7")
    assert host_of(made.supervisor.args) == "0.0.0.0"
    assert made.agent.local_url == "http://127.0.0.1:18081"
    assert made.agent.url == "http://10.0.0.7:18081"  # the server's own port added
    assert made._move_to(18090) is None
    assert made.agent.local_url == "http://127.0.0.1:18090"
    assert made.agent.url == "http://10.0.0.7:18090"  # still the external host
    assert made.supervisor.health_url == "http://127.0.0.1:18090/health"


def test_an_external_url_with_its_own_port_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_STATE_DIR", str(tmp_path))
    made = instance(tmp_path, host="10.0.0.7", external_url="http://lb.example:443")
    assert made.agent.local_url == "http://10.0.0.7:18081"  # a given address is polled there
    assert made._move_to(18091) is None
    assert made.agent.url == "http://lb.example:443"  # a mapping the operator set
