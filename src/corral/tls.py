"""TLS for corral's listeners and its agents' connections (the bottom layer: it imports
nothing of corral's). Every context is Python's default one (TLS 1.2 at least, the
system's ciphers), with corral's certificates in it.

A listener's context is made once from a PEM certificate (chain) and key and reloaded
in place when either file changes on disk (:class:`ServerCertificate`), so a rotation
(cert-manager writing a renewed Secret) takes effect at the next handshake without a
restart; connections already open keep the certificate they began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between checks of a certificate's files for a rotation.
RELOAD_INTERVAL = 5.0


class ServerCertificate:
    """The server context of ``cert`` and ``key``, reloaded when they change.

    With ``client_ca`` (mutual TLS) the listener asks every client for a certificate
    and verifies one it gets against that bundle; a client that sends none still
    connects (people and tools use the management token), and the handler decides with
    :func:`verified_peer`. A changed bundle adds its certificates at the next reload
    (one taken out stays trusted until a restart)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)  # raises for a bad pair: corral won't start
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_OPTIONAL
            self.context.load_verify_locations(cafile=str(client_ca))
        self._stamp = self._stamps()
        self.reloads = 0

    def _stamps(self) -> tuple[int, ...]:
        files = (self.cert, self.key) if self.client_ca is None else (
            self.cert, self.key, self.client_ca
        )  # fmt: skip
        return tuple(path.stat().st_mtime_ns for path in files)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed; True when the new pair took effect. A
        pair that does not load (half-written, mismatched) keeps the old one, logged."""
        try:
            stamp = self._stamps()
        except OSError as exc:
            log.warning("TLS certificate unreadable cert=%s error=%s", self.cert, exc)
            return False
        if stamp == self._stamp:
            return False
        try:
            self.context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                self.context.load_verify_locations(cafile=str(self.client_ca))
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "TLS certificate not reloaded (the old one stays) cert=%s error=%s", self.cert, exc
            )
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded cert=%s", self.cert)
        return True

    async def watch(self, interval: float = RELOAD_INTERVAL) -> None:
        """Reload on change, every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a watcher must outlive a bad moment
                self.reload_if_changed()


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """What an agent verifies a balancer's certificate against: ``ca`` (a PEM bundle),
    else the system's trust store; with ``cert`` and ``key``, the client certificate it
    presents (mutual TLS)."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def upstream_context(ca: Path | None, own: Path | None) -> ssl.SSLContext | None:
    """What a balancer verifies ``https://`` llama-servers with: ``ca`` (else the
    system's store), and with ``own`` (corral starts its servers over https with that
    certificate: ``llama_server_tls``) that certificate as an anchor too, by chain only,
    since servers are dialed by address and certificates name services. None: the
    system's store, with host names checked."""
    if own is None:
        return client_context(ca) if ca is not None else None
    context = client_context(ca)
    context.load_verify_locations(cafile=str(own))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


class ClientCertificate:
    """An agent's context toward balancers (:func:`client_context`) whose client
    certificate (mutual TLS) is loaded again when its files change: the agent calls
    :meth:`reload_if_changed` before each connection, so a rotated certificate is
    presented at the next one without a restart (a connection already open keeps the
    one it began with, as on the server side)."""

    def __init__(self, ca: Path | None, cert: Path | None = None, key: Path | None = None):
        self.context = client_context(ca, cert, key)
        self.cert, self.key = cert, key
        self._stamp = self._stamps()
        self.reloads = 0

    def _stamps(self) -> tuple[int, ...]:
        if self.cert is None or self.key is None:
            return ()
        return self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns

    def reload_if_changed(self) -> bool:
        """Load the pair again if it changed; True when the new one took effect. One that
        does not load (half-written, mismatched) keeps the old one, logged."""
        if self.cert is None or self.key is None:
            return False
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "TLS client certificate not reloaded (the old one stays) cert=%s error=%s",
                self.cert,
                exc,
            )
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS client certificate reloaded cert=%s", self.cert)
        return True


def verified_peer(transport: object) -> bool:
    """Whether the peer of a TLS ``transport`` presented a certificate that verified
    against the listener's ``client_ca`` (:class:`ServerCertificate`)."""
    get = getattr(transport, "get_extra_info", None)
    return bool(get("peercert")) if get is not None else False


def self_context(cert: Path) -> ssl.SSLContext:
    """For corral's own agents dialing its listener over loopback: trusts exactly the
    certificate it serves (the leaf itself is the anchor), without a hostname check (the
    name in the certificate is the one clients use, not 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(cert))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context
