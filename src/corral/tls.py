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
    """The server context of ``cert`` and ``key``, reloaded when they change."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)  # raises for a bad pair: corral won't start
        self._stamp = self._stamps()
        self.reloads = 0

    def _stamps(self) -> tuple[int, int]:
        return self.cert.stat().st_mtime_ns, self.key.stat().st_mtime_ns

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


def client_context(ca: Path | None) -> ssl.SSLContext:
    """What an agent verifies a balancer's certificate against: ``ca`` (a PEM bundle),
    else the system's trust store."""
    return ssl.create_default_context(cafile=str(ca) if ca is not None else None)


def self_context(cert: Path) -> ssl.SSLContext:
    """For corral's own agents dialing its listener over loopback: trusts exactly the
    certificate it serves (the leaf itself is the anchor), without a hostname check (the
    name in the certificate is the one clients use, not 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(cert))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context
