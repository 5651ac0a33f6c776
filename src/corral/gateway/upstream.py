"""Upstream: the connections to the instances, and one request sent on them.

:meth:`Upstream.open` sends a request to the instance its lease names and reads the
response head and first chunk; whatever lets the request be resent elsewhere (refused,
reset, a 502/503, a connection that died before the first byte) is
:class:`UpstreamFailed`. llama-server closes a connection after a streamed response
while advertising keep-alive, so a connection that carried a stream is closed, never
pooled, a spare is opened beside it (:meth:`Upstream.warm`), and a request whose pooled
connection dies before any response byte is resent once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from corral.gateway.notices import HEADER as NOTICES_HEADER
from corral.observe.metrics import BalancerMetrics
from corral.observe.tracing import NO_TRACE, NullTrace
from corral.scheduling.scheduler import Lease, SchedulingError

log = logging.getLogger(__name__)

#: A request header naming the instance a slotless request (``/slots``, a slot
#: action) is meant for, as the ``X-Corral-Instance`` response header named it.
INSTANCE_HEADER = "X-Corral-Instance"

#: Where a client puts its API key (llama-server reads both).
CLIENT_KEYS = frozenset({"authorization", "x-api-key"})

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "X-Model-Id",
        INSTANCE_HEADER,
        NOTICES_HEADER,
        # aiohttp decodes the body (gzip, deflate, ...): what goes upstream is plain
        "Content-Encoding",
    )
)
RESPONSE_DROP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Server", "Date")
)
RETRY_STATUSES = frozenset({502, 503})


@dataclass(frozen=True)
class UpstreamOptions:
    api_keys: tuple[str, ...] = ()
    """corral's own client keys: when set, a client's key stays here."""
    upstream_api_key: str | None = None
    """llama-server's ``--api-key``, sent upstream when corral checks keys itself."""
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    tls: ssl.SSLContext | None = None
    """What ``https://`` instances are verified with (``tls_ca``); None: the system's."""


class UpstreamFailed(Exception):
    """The upstream failed before any response byte reached the client."""


class IdleWatch:
    """Fails a response body's reader with :class:`TimeoutError` once a read has waited
    ``idle`` seconds for data.

    One timer per response, re-armed only when it fires: a relayed chunk costs a clock
    read instead of a timer created and cancelled (``asyncio.timeout`` around every
    read), which shows at tens of thousands of chunks a second. The relay loop sets
    :attr:`reading_since` before each read and clears it after; time spent writing to
    a slow client does not count, as with a timeout around the read alone.
    """

    __slots__ = ("handle", "idle", "loop", "reader", "reading_since")

    def __init__(self, idle: float, reader: aiohttp.StreamReader) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle = idle
        self.reader = reader
        self.reading_since: float | None = None
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(
            self.loop.time() + idle, self._check
        )

    def _check(self) -> None:
        now = self.loop.time()
        since = self.reading_since
        if since is None:  # not reading now: a full period from here
            self.handle = self.loop.call_at(now + self.idle, self._check)
        elif now - since >= self.idle:
            self.handle = None
            self.reader.set_exception(TimeoutError(f"no data for {self.idle:g} s"))
        else:
            self.handle = self.loop.call_at(since + self.idle, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def with_id_slot(body: bytes, slot: int) -> bytes:
    """``body`` (a JSON object) with ``"id_slot": slot`` as its first member.

    Spliced into the bytes rather than re-serialised, so the rest reaches llama-server
    exactly as the client sent it. The caller pins only bodies that parsed as an object
    without an ``id_slot`` of their own.
    """
    start = body.find(b"{")
    if start < 0:
        return body
    rest = body[start + 1 :]
    separator = b"" if rest.lstrip().startswith(b"}") else b","
    return b'{"id_slot":%d%s%s' % (slot, separator, rest)


class Upstream:
    """The client session to every instance; see the module doc."""

    def __init__(self, options: UpstreamOptions, metrics: BalancerMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self._warming: dict[str, set[asyncio.Task[None]]] = {}
        """Spare upstream connections being opened, by instance URL (see :meth:`warm`)."""

    async def start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=4.0,
            enable_cleanup_closed=True,
            ssl=self.options.tls if self.options.tls is not None else True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout),
        )

    async def stop(self, app: web.Application) -> None:
        for tasks in list(self._warming.values()):
            for task in list(tasks):
                task.cancel()
        if self.session is not None:
            await self.session.close()

    def warm(self, url: str, streams: int) -> None:
        """Put a spare connection to ``url`` in the pool, in the background.

        llama-server closes a connection after every stream, so without a spare the next
        request to it waits for a new TCP connection (on loopback that alone is about
        0.4 ms of this process's time; across hosts, a round trip more). When a stream
        starts, a ``GET /health`` (public, not logged by llama-server, answered without
        the model) opens a connection that stays pooled for the next request; when the
        pool already holds an idle one, it reuses that and adds none. At most one is
        being opened per stream in flight there (``streams``), so the spares never
        outnumber the instance's slots; a failure only means the next request connects
        itself.
        """
        tasks = self._warming.setdefault(url, set())
        if len(tasks) >= streams or self.session is None or self.session.closed:
            return
        task = asyncio.ensure_future(self._open_spare(url))
        tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not tasks and self._warming.get(url) is tasks:
                del self._warming[url]

        task.add_done_callback(done)

    async def _open_spare(self, url: str) -> None:
        assert self.session is not None
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                async with self.session.get(url.rstrip("/") + "/health") as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("spare connection to %s failed: %s", url, exc)

    def headers(self, request: web.Request, request_id: str) -> dict[str, str]:
        """The client's headers as llama-server gets them.

        Keys: when corral checks keys (``api_keys``), the client's key is corral's and
        stays here; llama-server gets its own key (``llama_server_api_key``) when one is
        set. When corral checks none, the client's key goes through untouched, so a
        llama-server with ``--api-key`` checks it as it would without corral.
        """
        checked = bool(self.options.api_keys)
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and not (checked and k.lower() in CLIENT_KEYS)
        }
        if checked and self.options.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.options.upstream_api_key}"
        headers["X-Request-Id"] = request_id
        return headers

    async def open(
        self,
        request: web.Request,
        body: bytes,
        lease: Lease,
        headers: dict[str, str],
        trace: NullTrace = NO_TRACE,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the request upstream and read its head and first chunk.

        Returns the response and its first body chunk (b"" at end of body). Raises
        :class:`UpstreamFailed` for anything that lets the request be resent: refused,
        reset, a 502/503, or a connection that died before the first body byte.
        """
        assert self.session is not None
        url = lease.instance.url.rstrip("/") + request.rel_url.raw_path_qs
        if lease.slot is not None:
            body = with_id_slot(body, lease.slot)
        for attempt in (0, 1):
            response: aiohttp.ClientResponse | None = None
            try:
                async with asyncio.timeout(self.options.first_byte_timeout):
                    response = await self.session.request(
                        request.method,
                        url,
                        data=body or None,
                        headers=headers,
                        allow_redirects=False,
                    )
                    trace.answered()
                    if response.status in RETRY_STATUSES:
                        detail = (await response.read())[:200].decode(errors="replace")
                        response.release()
                        raise UpstreamFailed(f"upstream answered {response.status}: {detail}")
                    if response.content_type == "text/event-stream":
                        # llama-server closes a connection after a stream while
                        # advertising keep-alive: never let the pool reuse this one
                        # (aiohttp would return it to the pool when the body ends)
                        connection = response.connection
                        if connection is not None and connection.protocol is not None:
                            connection.protocol.force_close()
                        self.warm(lease.instance.url, lease.instance.in_flight)
                    first = await response.content.readany()
                    trace.first_bytes()
                    return response, first
            except UpstreamFailed:
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if response is not None:
                    response.close()
                if attempt == 0 and not isinstance(exc, aiohttp.ClientConnectorError):
                    # a pooled connection the server had already closed: resend
                    self.metrics.stale_connections.inc()
                    continue
                raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
            except aiohttp.ClientError as exc:
                if response is not None:
                    response.close()
                raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
            except TimeoutError:
                if response is not None:
                    response.close()
                raise SchedulingError(
                    f"instance {lease.instance.id} sent no response within "
                    f"{self.options.first_byte_timeout:g} s"
                ) from None
        raise AssertionError("unreachable")
