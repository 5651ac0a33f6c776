"""Prometheus metrics of a balancer, all named with the ``corral_`` prefix.

Counters and histograms are updated as requests finish; the fleet gauges (slots,
buffer, agents) are computed at scrape time from the scheduler, so they can never
drift from the state the scheduler acts on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from corral.scheduling.scheduler import Scheduler

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class FleetCollector(Collector):
    """Slot and buffer gauges read from the scheduler at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fleet = self.scheduler.fleet
        labels = ["instance", "model"]
        total = GaugeMetricFamily("corral_slots_total", "Slots of an instance.", labels=labels)
        busy = GaugeMetricFamily(
            "corral_slots_busy", "Busy slots of an instance (estimate).", labels=labels
        )
        free = GaugeMetricFamily("corral_slots_free", "Free slots of an instance.", labels=labels)
        in_flight = GaugeMetricFamily(
            "corral_requests_in_flight",
            "Requests this balancer has in flight on an instance.",
            labels=labels,
        )
        for instance in fleet.instances.values():
            key = [instance.id, instance.model]
            total.add_metric(key, instance.total_slots)
            busy.add_metric(key, instance.busy_slots)
            free.add_metric(key, instance.free_slots)
            in_flight.add_metric(key, instance.in_flight)
        buffered = GaugeMetricFamily(
            "corral_buffered_requests", "Requests waiting in a model's buffer.", labels=["model"]
        )
        for model in self.scheduler.buffers:
            buffered.add_metric([model], self.scheduler.buffered(model))
        agents = GaugeMetricFamily("corral_agents_connected", "Agents connected.")
        agents.add_metric([], len(fleet.agents))
        yield from (total, busy, free, in_flight, buffered, agents)


class BalancerMetrics:
    """The balancer's metric objects, in a registry of its own."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FleetCollector(scheduler))
        self.requests = Counter(
            "corral_responses",
            "Responses sent, by model, route and status.",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "corral_request_duration_seconds",
            "Time from request arrival to the end of its response.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "Time from request arrival to the first response byte relayed.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.buffer_wait = Histogram(
            "corral_buffer_wait_seconds",
            "Time a request waited in the buffer before getting a slot.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens",
            "Prompt tokens of answered requests, by whether the server had them cached.",
            ["model", "instance", "cache"],
            registry=self.registry,
        )
        self.stale_connections = Counter(
            "corral_upstream_stale_connections",
            "Requests resent at once because a pooled upstream connection was already "
            "closed by the server (should stay near zero).",
            registry=self.registry,
        )
        self.retries = Counter(
            "corral_upstream_retries",
            "Requests resent to another instance after an upstream failure before the first byte.",
            ["model"],
            registry=self.registry,
        )
