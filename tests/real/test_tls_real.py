"""The real llama-server over https: built with OpenSSL (the build variant
``CORRAL_LLAMA_SERVER_CMAKE_ARGS=-DLLAMA_OPENSSL=ON``, which ``scripts/bootstrap``
builds and caches beside the default one), started by ``corral serve`` with corral's own
certificate (``llama_server_tls``), read by its agent and relayed by its balancer over
TLS. Certificates are made in the test by trustme."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme

from corral.supervisor.binary import CMAKE_ARGS_VARIABLE, LlamaServerNotFound, find_llama_server
from corral.tls import client_context
from tests.support.local_serve import serving_table

pytestmark = pytest.mark.real

OPENSSL = "-DLLAMA_OPENSSL=ON"


@pytest.fixture(scope="session")
def llama_server_ssl_bin() -> Path:
    """The OpenSSL build of llama-server (fails loudly when it is not installed)."""
    try:
        return find_llama_server(environ={**os.environ, CMAKE_ARGS_VARIABLE: OPENSSL}).path
    except LlamaServerNotFound as exc:
        pytest.fail(
            f"the https tests need llama-server built with OpenSSL: {exc} (run "
            f"`{CMAKE_ARGS_VARIABLE}={OPENSSL} corral llama-server install --no-ui`, "
            "as scripts/bootstrap does)"
        )


async def test_serve_runs_the_real_llama_server_over_https(
    llama_server_ssl_bin: Path,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    table = {"tiny": {"path": str(tiny_model), "args": ["-c", "512", "-np", "1"]}}
    settings = {"tls_cert": str(cert), "tls_key": str(key), "llama_server_tls": True}
    async with serving_table(
        tmp_path, monkeypatch, table, llama_server_ssl_bin, startup_timeout=120, **settings
    ) as (local, _, http):
        trusted = client_context(ca_file)
        front = f"https://{local.balancer.addresses.inference}/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with http.post(front, json=body, ssl=trusted) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert answer["usage"]["completion_tokens"] == 4
        (instance,) = local.balancer.scheduler.fleet.pool("tiny")
        assert instance.url.startswith("https://127.0.0.1:")
        # llama-server itself answers over TLS with corral's certificate
        async with http.get(instance.url + "/health", ssl=trusted) as response:
            assert response.status == 200
