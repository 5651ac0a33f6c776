"""TLS on the listeners and between agents and balancers, with certificates made in the
test by trustme: a client over https, an agent over wss:// with and without the CA, a
certificate rotated on disk, and corral serve's own agents over its TLS listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp.test_utils import TestServer

from corral.agent import Agent
from corral.testing.fake_llama_server import FakeOptions, build_app
from corral.tls import ClientCertificate, client_context
from tests.support.fleet import CHAT, MANAGEMENT_TOKEN, start_fleet, watching
from tests.support.local_serve import serving
from tests.support.waiting import wait_for


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


async def stop_agents(agents: list[tuple[Agent, asyncio.Task[None]]]) -> None:
    for made, task in agents:
        await made.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def peer_certificate(address: str, context: ssl.SSLContext) -> bytes:
    host, port = address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return bytes(der)


async def test_listeners_serve_tls_agents_verify_it_and_a_rotation_needs_no_restart(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.agent")
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fleet = await start_fleet(tls_cert=str(cert), tls_key=str(key))
    addresses = fleet.balancer.addresses
    trusted = client_context(ca_file)
    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server()
    agents: list[tuple[Agent, asyncio.Task[None]]] = []

    def agent(tls: ssl.SSLContext | None) -> Agent:
        made = Agent(watching(server, [f"https://{addresses.management}"], tls=tls))
        agents.append((made, asyncio.create_task(made.run())))
        return made

    try:
        # an agent that does not trust the certificate is refused, and says why
        untrusting = agent(None)
        await wait_for(lambda: untrusting.links[0].failures > 0, "the untrusted handshake")
        assert "TLS certificate is not trusted" in untrusting.links[0].last_error
        assert "--tls-ca" in caplog.text
        assert not fleet.balancer.scheduler.fleet.instances
        # one with the CA registers over wss://, and requests go over https
        agent(trusted)
        await wait_for(lambda: fleet.usable() == 1, "the instance over wss://")
        async with aiohttp.ClientSession() as http:
            url = f"https://{addresses.inference}/v1/chat/completions"
            async with http.post(url, json={**CHAT, "model": "m"}, ssl=trusted) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer
                async with http.get(f"http://{addresses.inference}/health") as response:
                    await response.read()
        # a renewed certificate written over the old one is served at the next handshake
        before = await peer_certificate(addresses.inference, trusted)
        write_pair(ca, tmp_path)
        certificate = fleet.balancer.certificate
        assert certificate is not None
        await wait_for(certificate.reload_if_changed, "the reload", 5.0)
        after = await peer_certificate(addresses.management, trusted)
        assert after != before and certificate.reloads == 1
        assert fleet.usable() == 1  # the open agent socket carries on
    finally:
        await stop_agents(agents)
        await server.close()
        await fleet.close()


async def test_a_half_written_certificate_keeps_the_old_one(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_pair(ca, tmp_path)
    fleet = await start_fleet(tls_cert=str(cert), tls_key=str(key))
    try:
        certificate = fleet.balancer.certificate
        assert certificate is not None
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
        assert certificate.reload_if_changed() is False
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        await peer_certificate(fleet.balancer.addresses.inference, client_context(ca_file))
    finally:
        await fleet.close()


async def test_serve_over_tls_reports_its_own_instances_and_answers(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = {"tls_cert": str(cert), "tls_key": str(key)}
    async with serving(tmp_path, monkeypatch, {"a": {}}, **settings) as (local, base, http):
        assert base.startswith("http://")  # the helper's; the listener speaks TLS
        address = local.balancer.addresses.inference
        url = f"https://{address}/v1/chat/completions"
        body = {**CHAT, "model": "a", "max_tokens": 2}
        async with http.post(url, json=body, ssl=client_context(ca_file)) as response:
            assert response.status == 200, await response.text()
        assert local.host is not None and local.host.state("a").value == "loaded"


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    from corral.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(environ={}, overrides={"tls_cert": str(tmp_path / "c.pem")})


async def test_status_reads_a_tls_management_listener_with_its_ca(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fleet = await start_fleet(tls_cert=str(cert), tls_key=str(key))
    try:
        env = {**os.environ, "CORRAL_MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
        base = [sys.executable, "-m", "corral.cli", "status", "--json"]
        base += ["--management-addr", fleet.balancer.addresses.management]
        for extra, code in ((["--tls-ca", str(ca_file)], 0), ([], 1)):
            process = await asyncio.create_subprocess_exec(
                *base, *extra, stdout=PIPE, stderr=PIPE, env=env
            )
            out, err = await process.communicate()
            assert process.returncode == code, err.decode()
            if code == 0:
                assert json.loads(out)["instances"] == []
            else:  # plain http to a TLS listener: no answer, and the error says where
                assert "cannot reach the balancer's management API" in err.decode()
    finally:
        await fleet.close()


def write_client_pair(ca: trustme.CA, folder: Path, name: str) -> tuple[Path, Path]:
    issued = ca.issue_cert(name)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key_path.write_bytes(issued.private_key_pem.bytes())
    return cert_path, key_path


@pytest.mark.parametrize("agent_auth", ["certificate", "both"])
async def test_mutual_tls_lets_in_agents_with_a_client_certificate(
    agent_auth: str, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    outsider = trustme.CA()  # a certificate from another CA is no better than none
    fleet = await start_fleet(
        tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ca_file), agent_auth=agent_auth
    )
    management = f"https://{fleet.balancer.addresses.management}"
    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server()
    agents: list[tuple[Agent, asyncio.Task[None]]] = []

    def agent(client: tuple[Path, Path] | None, **options: str) -> Agent:
        tls = client_context(ca_file, *(client or (None, None)))
        made = Agent(watching(server, [management], tls=tls, **options))
        agents.append((made, asyncio.create_task(made.run())))
        return made

    try:
        # no client certificate: refused, whatever the token
        bare = agent(None)
        foreign = agent(write_client_pair(outsider, tmp_path, "foreign"))
        await wait_for(lambda: bare.links[0].refusals > 0, "the refusal")
        assert "refused" in bare.links[0].last_error
        await wait_for(lambda: foreign.links[0].failures > 0, "the foreign certificate")
        pair = write_client_pair(ca, tmp_path, "agent-1")
        if agent_auth == "both":  # a good certificate with a wrong token: refused too
            wrong = agent(pair, cluster_token="wrong")
            await wait_for(lambda: wrong.links[0].refusals > 0, "the token's refusal")
        assert not fleet.balancer.scheduler.fleet.instances
        # a certificate the balancer's CA issued: registered (with the token for "both";
        # under "certificate" the token is not looked at)
        token = {} if agent_auth == "both" else {"cluster_token": "not-checked"}
        agent(pair, **token)
        await wait_for(lambda: fleet.usable() == 1, "the agent with its certificate")
        # people and tools without a certificate still use the management token
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                management + "/api/v1/fleet",
                headers={"Authorization": f"Bearer {MANAGEMENT_TOKEN}"},
                ssl=client_context(ca_file),
            ) as response,
        ):
            assert response.status == 200
    finally:
        await stop_agents(agents)
        await server.close()
        await fleet.close()


def test_mutual_tls_settings_say_what_is_missing(tmp_path: Path) -> None:
    from corral.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="set tls_client_ca"):
        load_settings(environ={}, overrides={"agent_auth": "certificate"})
    with pytest.raises(ConfigError, match="tls_client_ca needs TLS"):
        load_settings(environ={}, overrides={"tls_client_ca": str(tmp_path / "ca.pem")})
    with pytest.raises(ConfigError, match="tls_client_cert and tls_client_key go together"):
        load_settings(environ={}, overrides={"tls_client_cert": str(tmp_path / "c.pem")})


async def test_an_https_llama_server_is_verified_against_the_ca(
    ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(served)
    # llama-server with --ssl-key-file/--ssl-cert-file: the fake speaks https the same way
    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server(ssl=served)
    assert str(server.make_url("")).startswith("https://")
    agents: list[tuple[Agent, asyncio.Task[None]]] = []

    def agent(fleet_address: str, upstream: ssl.SSLContext | None) -> Agent:
        made = Agent(watching(server, [fleet_address], upstream_tls=upstream))
        agents.append((made, asyncio.create_task(made.run())))
        return made

    trusting = await start_fleet(tls_ca=str(ca_file))
    untrusting = await start_fleet()
    try:
        # an agent without the CA cannot read it: the instance is reported unusable
        blind = agent(untrusting.balancer.addresses.management, None)
        instances = untrusting.balancer.scheduler.fleet.instances
        await wait_for(lambda: blind.seq > 0 and bool(instances), "the blind agent report")
        (seen,) = instances.values()
        await wait_for(lambda: bool(seen.issues), "the certificate problem")
        assert "certificate" in seen.issues[0].message.lower(), seen.issues
        assert untrusting.usable() == 0
        # with it, the agent reports the instance and the balancer relays over https
        agent(trusting.balancer.addresses.management, client_context(ca_file))
        await wait_for(lambda: trusting.usable() == 1, "the instance over https")
        status, body, _ = await trusting.chat("m")
        assert status == 200, body
    finally:
        await stop_agents(agents)
        await server.close()
        await trusting.close()
        await untrusting.close()


async def test_balancers_found_by_name_are_verified_by_that_name(
    ca: trustme.CA, tmp_path: Path
) -> None:
    name = "balancers.corral.test"  # a headless Service: the certificate names it, not pods
    issued = ca.issue_cert(name)
    cert, key = tmp_path / "name.pem", tmp_path / "name.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fleet = await start_fleet(tls_cert=str(cert), tls_key=str(key))
    port = int(fleet.balancer.addresses.management.rsplit(":", 1)[1])

    async def resolve(host: str, asked_port: int) -> list[str]:
        assert host == name
        return ["127.0.0.1"]

    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server()
    agent = Agent(
        watching(server, [f"https://{name}:{port}"], tls=client_context(ca_file), resolve=resolve)
    )
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: fleet.usable() == 1, "the agent over wss:// to 127.0.0.1")
        assert agent.links[0].socket_url == f"wss://127.0.0.1:{port}/api/v1/agents/socket"
    finally:
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close()
        await fleet.close()


async def test_serve_starts_its_llama_servers_over_https_with_its_own_pair(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = {"tls_cert": str(cert), "tls_key": str(key), "llama_server_tls": True}
    async with serving(tmp_path, monkeypatch, {"a": {}}, **settings) as (local, _, http):
        address = local.balancer.addresses.inference
        url = f"https://{address}/v1/chat/completions"
        body = {**CHAT, "model": "a", "max_tokens": 2}
        async with http.post(url, json=body, ssl=client_context(ca_file)) as response:
            assert response.status == 200, await response.text()
        (instance,) = local.balancer.scheduler.fleet.pool("a")
        assert instance.url.startswith("https://127.0.0.1:")  # polled and relayed over TLS
        assert local.host is not None
        args = local.host.running["a"].managed.supervisor.args
        assert args[args.index("--ssl-cert-file") + 1] == str(cert)
        assert args[args.index("--ssl-key-file") + 1] == str(key)
        # it really speaks TLS: plain http gets no answer from it
        with pytest.raises(aiohttp.ClientError):
            async with http.get(instance.url.replace("https://", "http://") + "/health") as r:
                await r.read()


def test_llama_server_tls_needs_the_pair_and_owns_the_ssl_flags(tmp_path: Path) -> None:
    from corral.config import ConfigError, load_settings
    from corral.supervisor.managed import check_reserved

    with pytest.raises(ConfigError, match="llama_server_tls serves llama-servers with tls_cert"):
        load_settings(environ={}, overrides={"llama_server_tls": True})
    with pytest.raises(ValueError, match="llama_server_tls serves https"):
        check_reserved(["--ssl-key-file", "k.pem", "-np", "2"])


async def test_an_agents_rotated_client_certificate_is_presented_without_a_restart(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fleet = await start_fleet(
        tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ca_file), agent_auth="certificate"
    )
    server = TestServer(build_app(FakeOptions(model="m", slots=2)))
    await server.start_server()
    # its first certificate comes from a CA the balancer does not know (an expired or
    # revoked one stands for the same): refused until the files on disk are replaced
    client_cert, client_key = write_client_pair(trustme.CA(), tmp_path, "agent")
    certificate = ClientCertificate(ca_file, client_cert, client_key)
    options = watching(
        server,
        [f"https://{fleet.balancer.addresses.management}"],
        tls=certificate.context,
        tls_reload=certificate.reload_if_changed,
    )
    agent = Agent(options)
    agents = [(agent, asyncio.create_task(agent.run()))]
    try:
        await wait_for(lambda: agent.links[0].failures > 1, "the refused certificate")
        assert not fleet.balancer.scheduler.fleet.instances
        write_client_pair(ca, tmp_path, "agent")  # cert-manager renewing the Secret
        await wait_for(lambda: fleet.usable() == 1, "the renewed certificate to be let in")
        assert certificate.reloads == 1
    finally:
        await stop_agents(agents)
        await server.close()
        await fleet.close()
