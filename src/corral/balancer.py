"""The balancer process: the inference front door plus the management API.

It wires one :class:`~corral.scheduling.scheduler.Scheduler` (the fleet picture and
the buffers) to two HTTP servers on the same event loop: the gateway on the inference
address and the management API (agents' WebSocket, fleet views, metrics) on the
management address. A background task takes instances out of their pools when their
agent stops reporting; its beat is the liveness ``/livez`` reports, and ``/readyz``
follows start and shutdown (:mod:`corral.control.probes`).

Shutdown is graceful: the inference listener closes first and requests already
accepted, buffered ones included, get up to ``shutdown_timeout`` to finish; only then
does the management side (and with it the agents' connections) go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from corral.catalog.catalog import Catalog
from corral.config import Settings
from corral.control.management import Management
from corral.gateway.guard import ConnectionLimits, GuardedAppRunner
from corral.gateway.options import GatewayOptions
from corral.gateway.proxy import Gateway
from corral.observe import redact, tracing
from corral.observe.metrics import BalancerMetrics
from corral.observe.recent import RecentTraffic
from corral.observe.statsd import StatsdPusher
from corral.observe.tracing import Tracing
from corral.protocol import HostReport
from corral.scheduling.policies import make_policy
from corral.scheduling.scheduler import Scheduler
from corral.supervisor.host import HostOptions, ModelHost
from corral.supervisor.machines import Send
from corral.tls import ServerCertificate, self_context, upstream_context

log = logging.getLogger(__name__)

#: How often instances are checked for missed agent reports.
STALE_CHECK_INTERVAL = 0.5


@dataclass(frozen=True)
class BoundAddresses:
    inference: str
    management: str


class Balancer:
    """A running balancer: start it, serve, then stop it (gracefully)."""

    def __init__(
        self,
        settings: Settings,
        *,
        management_token: str,
        cluster_token: str,
        scheduler: Scheduler | None = None,
        service: str = "corral-balancer",
    ) -> None:
        redact.add_secrets([management_token, cluster_token, *settings.resolved_api_keys()])
        self.settings = settings
        self.scheduler = scheduler or Scheduler(
            make_policy(settings.policy, pin_slots=settings.pin_slots),
            max_buffered=settings.max_buffered_requests,
            buffer_timeout=settings.buffered_request_timeout,
            report_timeout=settings.agent_report_timeout,
            default_model=settings.default_model,
        )
        self.metrics = BalancerMetrics(self.scheduler)
        self.gateway = Gateway(
            self.scheduler,
            self.metrics,
            GatewayOptions(
                api_keys=settings.resolved_api_keys(),
                upstream_api_key=(
                    settings.llama_server_api_key.get_secret_value()
                    if settings.llama_server_api_key
                    else None
                ),
                max_body=settings.max_request_body_bytes,
                body_timeout=settings.client_body_timeout,
                max_retries=settings.max_retries,
                connect_timeout=settings.upstream_connect_timeout,
                first_byte_timeout=settings.upstream_first_byte_timeout,
                idle_timeout=settings.upstream_idle_timeout,
                cors_origins=tuple(settings.cors_origins),
                expose_slots=settings.expose_slots,
                loading_notices=settings.loading_notices,
                upstream_tls=upstream_context(
                    settings.tls_ca, settings.tls_cert if settings.llama_server_tls else None
                ),
            ),
        )
        self.management = Management(
            self.scheduler,
            self.metrics,
            management_token=management_token,
            cluster_token=cluster_token,
            agent_auth=settings.agent_auth,
        )
        self.traffic = RecentTraffic()
        self.gateway.traffic = self.traffic
        self.management.traffic = self.traffic
        self.statsd = (
            StatsdPusher(self.scheduler, settings.statsd_addr, settings.statsd_prefix)
            if settings.statsd_addr
            else None
        )
        self.probes = self.management.probes
        self._runners: list[web.AppRunner] = []
        self._stale_task: asyncio.Task[None] | None = None
        self.certificate: ServerCertificate | None = None
        """TLS on both listeners (``tls_cert``/``tls_key``), reloaded when its files change."""
        self._cert_task: asyncio.Task[None] | None = None
        self.addresses = BoundAddresses("", "")
        self.service = service
        """The service name traces carry unless ``OTEL_SERVICE_NAME`` gives one."""
        self.tracing: Tracing | None = None
        """Traces (:mod:`corral.observe.tracing`), when the ``OTEL_*`` variables ask."""
        self.cluster_token = cluster_token
        self.model_host: ModelHost | None = None
        """The model host: ``corral serve``'s own, or the one a balancer makes when the
        first remote model host registers (placing models on remote hosts only)."""
        self.management.on_host_report = self._host_report
        self.management.on_host_gone = self._host_gone

    async def start(self) -> BoundAddresses:
        """Listen on both addresses (port 0 picks a free port); return what was bound."""
        bound: list[str] = []
        self.tracing = tracing.from_environment(self.service)  # TracingError: bad OTEL_*
        if self.tracing is not None:
            self.gateway.admission.tracing = self.tracing
            self.tracing.watch(self.scheduler)
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            self.certificate = ServerCertificate(
                self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca
            )
        for app, (host, port) in (
            (self.gateway.app, self.settings.inference_host_port()),
            (self.management.app, self.settings.management_host_port()),
        ):
            runner = GuardedAppRunner(
                app,
                ConnectionLimits(
                    header_timeout=self.settings.client_header_timeout,
                    max_connections=self.settings.max_client_connections,
                ),
                access_log=None,
                handle_signals=False,
                shutdown_timeout=self.settings.shutdown_timeout,
                # a client that goes away cancels its handler: a buffered request
                # leaves the buffer at once and an upstream request is abandoned
                handler_cancellation=True,
            )
            await runner.setup()
            if self.certificate is None and not _loopback(host):
                log.warning(
                    "listening on %s:%s without TLS: tokens, keys and prompts cross the "
                    "network in clear text (set tls_cert and tls_key, or put it behind a "
                    "mesh that encrypts)",
                    host,
                    port,
                )
            site = web.TCPSite(
                runner,
                host,
                port,
                reuse_address=True,
                ssl_context=self.certificate.context if self.certificate is not None else None,
            )
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                await self._cleanup()
                raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
            self._runners.append(runner)
            sock_host, sock_port = runner.addresses[0][:2]
            bound.append(f"{sock_host}:{sock_port}")
        self.addresses = BoundAddresses(bound[0], bound[1])
        self.probes.beat()
        self.probes.started = True
        self._stale_task = asyncio.create_task(self._check_stale(), name="stale-check")
        if self.certificate is not None:
            self._cert_task = asyncio.create_task(self.certificate.watch(), name="tls-reload")
        if self.statsd is not None:
            await self.statsd.start()
        log.info(
            "balancer listening inference=%s management=%s policy=%s",
            self.addresses.inference,
            self.addresses.management,
            self.scheduler.policy.name,
        )
        return self.addresses

    @property
    def scheme(self) -> str:
        """How clients reach both listeners: ``https`` with TLS, else ``http``."""
        return "https" if self.certificate is not None else "http"

    @property
    def agent_address(self) -> str:
        """Where this process's own agents report: the management address, over TLS
        when the listeners have it."""
        return f"{self.scheme}://{self.addresses.management}"

    @property
    def agent_tls(self) -> ssl.SSLContext | None:
        """What this process's own agents verify the listener with: its own certificate."""
        return self_context(self.certificate.cert) if self.certificate is not None else None

    def _host_report(self, report: HostReport, send: Send) -> None:
        host = self.model_host
        if host is None:
            host = self.model_host = self._fleet_host()
        host.remote_report(report, send)

    def _host_gone(self, host_id: str) -> None:
        if self.model_host is not None:
            self.model_host.remote_gone(host_id)

    def _fleet_host(self) -> ModelHost:
        """A model host with no machine of its own: it places models on the remote model
        hosts that register, and answers the model routes for them."""
        host = ModelHost(
            self.settings,
            Catalog([], {}),
            self.scheduler,
            HostOptions(
                binary=None,
                balancer=self.agent_address,
                cluster_token=self.cluster_token,
                tls=self.agent_tls,
            ),
        )
        host.local = False
        self.scheduler.loader = host
        self.scheduler.load_allowance = self.settings.startup_timeout + self.settings.drain_timeout
        self.management.host = host
        self.gateway.host = host
        host.start()
        log.info("placing models on remote model hosts")
        return host

    async def _check_stale(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_INTERVAL)
            self.scheduler.check_stale()
            self.probes.beat()

    async def stop(self) -> None:
        """Stop taking requests, let accepted ones finish (bounded), then close."""
        log.info("balancer stopping; in-flight requests may finish")
        self.probes.stopping = True
        # The inference runner's cleanup closes the listener, then waits for running
        # handlers (buffered requests too) up to shutdown_timeout.
        if self._runners:
            await self._runners.pop(0).cleanup()
        self.scheduler.accepting = False
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.model_host is not None and not self.model_host.local:
            await self.model_host.stop()  # the remote hosts' servers keep running
        if self.statsd is not None:
            await self.statsd.stop()
        if self.tracing is not None:  # the last spans go out (bounded by the exporter)
            await asyncio.to_thread(self.tracing.shutdown)
            self.tracing = None
        for task in (self._stale_task, self._cert_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._stale_task = self._cert_task = None
        while self._runners:
            await self._runners.pop().cleanup()


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:  # "" (every interface) and other names are not
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
