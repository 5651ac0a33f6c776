"""What every command shares: errors, settings from flags, running a service, tokens."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from corral.config import Settings, load_settings
from corral.tls import client_context, self_context

if TYPE_CHECKING:
    pass


def _err(message: str) -> None:
    sys.stderr.write(f"corral: {message}\n")


def management_endpoint(
    settings: Settings, addr: str, path: str
) -> tuple[str, ssl.SSLContext | None]:
    """The URL of ``path`` on the management API at ``addr``, and the TLS context to
    read it with: over https when the settings name a CA (``tls_ca``) or the
    listener's certificate (``tls_cert``: the balancer's own config, whose certificate
    is then trusted as it is), else plain http."""
    if settings.tls_ca is not None:
        return f"https://{addr}{path}", client_context(settings.tls_ca)
    if settings.tls_cert is not None:
        return f"https://{addr}{path}", self_context(settings.tls_cert)
    return f"http://{addr}{path}", None


def settings_from(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from ``--config``, the environment and the given flag overrides."""
    return load_settings(getattr(args, "config", None), overrides=overrides or {})


# -- config ------------------------------------------------------------------------------


def _run_service(main_coro: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run ``main_coro(stop_event)`` on uvloop; SIGINT/SIGTERM set the event."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main_coro(stop)

    try:
        import uvloop

        return uvloop.run(runner())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(runner())


def _require_loopback(settings: Settings, what: str, how: str) -> None:
    """Generated secrets are only for a loopback management address."""
    from corral.tokens import TokenError, is_loopback

    host, _ = settings.management_host_port()
    if not is_loopback(host):
        raise TokenError(
            f"the management address {settings.management_addr} is not loopback, so "
            f"{what}: set {how}"
        )


def _management_token(settings: Settings) -> str:
    from corral.tokens import generated_token
    from corral.tokens import management_token_file as default_file

    token = settings.resolved_management_token()
    if token:
        return token
    _require_loopback(
        settings,
        "a management token is required",
        "CORRAL_MANAGEMENT_TOKEN or --management-token-file",
    )
    path = default_file()
    token, created = generated_token(path)
    sys.stderr.write(
        f"management token {'generated' if created else 'reused'}; read it with: cat {path}\n"
    )
    return token


def _cluster_token(settings: Settings, *, create: bool) -> str:
    from corral.tokens import TokenError, generated_token, read_token_file
    from corral.tokens import cluster_token_file as default_file

    token = settings.resolved_cluster_token()
    if token:
        return token
    path = default_file()
    if create:
        _require_loopback(
            settings, "agents need a cluster token", "CORRAL_CLUSTER_TOKEN or --cluster-token-file"
        )
        token, created = generated_token(path)
        if created:
            sys.stderr.write(f"cluster token generated for agents: {path}\n")
        return token
    found = read_token_file(path)
    if found:
        return found
    raise TokenError(
        "an agent needs the balancer's cluster token: set CORRAL_CLUSTER_TOKEN or "
        f"--cluster-token-file (a balancer on this machine writes it to {path})"
    )
