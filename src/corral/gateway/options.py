"""The front door's settings (from :class:`corral.config.Settings`, see
:mod:`corral.balancer`)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass
class GatewayOptions:
    api_keys: list[str]
    max_body: int
    body_timeout: float = 60.0
    """Seconds a client has to send its whole request body (then 408)."""
    max_retries: int = 2
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    upstream_api_key: str | None = None
    """llama-server's ``--api-key``, sent upstream when corral checks keys itself."""
    cors_origins: tuple[str, ...] = ()
    expose_slots: bool = False
    loading_notices: bool = False
    """Loading notices for streaming chat requests that wait for their model (see
    :mod:`corral.gateway.notices`); a model's own setting and a request header win."""
    upstream_tls: ssl.SSLContext | None = None
    """What ``https://`` instances are verified with (``tls_ca``); None: the system's."""
