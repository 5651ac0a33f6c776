"""Prometheus metrics of a balancer, all named with the ``corral_`` prefix.

Counters and histograms are updated as requests finish; the fleet gauges (slots,
buffer, agents, the autoscaling signal) and the placement decisions are computed at
scrape time from the scheduler, so they can never drift from the state the scheduler
acts on. ``docs/metrics.md`` lists every metric (a test keeps it in step).

Instance starts, restarts, failures and startup times come from the supervisors: each
reports cumulative counts in the ``supervisor`` part of its agent's snapshots, and the
balancer counts what grew since the last snapshot (:meth:`BalancerMetrics.observe_supervisors`).
So they work for ``corral serve`` and for remote ``corral agent --model`` alike; an
external llama-server an agent only watches has no supervisor and counts nothing.
Model swap times come from the local model host's ``loaded`` events.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.observe.autoscaling import fleet_demand

if TYPE_CHECKING:
    from corral.fleet.state import Instance
    from corral.scheduling.scheduler import Scheduler

#: Supervisors whose last counts are remembered (an instance that comes back after its
#: agent reconnected is not counted twice); the oldest are forgotten beyond this.
SUPERVISORS_REMEMBERED = 4096

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

    def collect(self) -> Iterator[Metric]:
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
        wanted = GaugeMetricFamily(
            "corral_autoscaling_wanted_instances",
            "Instances a model wants for its busy slots and buffer (docs/autoscaling.md).",
            labels=["model"],
        )
        for demand in fleet_demand(self.scheduler):
            wanted.add_metric([demand.model], demand.wanted_instances)
        decisions = CounterMetricFamily(
            "corral_placement_decisions",
            "Placements by the reason the policy gave (prefix policy only).",
            labels=["reason"],
        )
        counts: Tally[str] = self.scheduler.policy.decisions
        for reason, count in sorted(counts.items()):
            decisions.add_metric([reason], count)
        yield from (total, busy, free, in_flight, buffered, agents, wanted, decisions)


@dataclass
class _SupervisorCounts:
    """The cumulative counts a supervisor last reported."""

    launches: int = 0
    restarts: int = 0
    failed_runs: int = 0
    readies: int = 0


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
            "Time from request arrival to the end of its response, by model, route and status.",
            ["model", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "Time from request arrival to the first response byte relayed from an instance "
            "(responses corral answers itself have none), by the response's final status.",
            ["model", "route", "status"],
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
        self.generated_tokens = Counter(
            "corral_generated_tokens",
            "Tokens generated for answered requests (usage.completion_tokens, else "
            "timings.predicted_n).",
            ["model", "instance"],
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
        self.instance_starts = Counter(
            "corral_instance_starts",
            "llama-server processes a supervisor launched (first starts and restarts).",
            ["model"],
            registry=self.registry,
        )
        self.instance_restarts = Counter(
            "corral_instance_restarts",
            "Launches that were restarts: after a crash or a failed start, or by an operator.",
            ["model"],
            registry=self.registry,
        )
        self.instance_failures = Counter(
            "corral_instance_failures",
            "Runs that failed: exited unexpectedly, or did not become ready.",
            ["model"],
            registry=self.registry,
        )
        self.startup_duration = Histogram(
            "corral_instance_startup_seconds",
            "Time from launching llama-server to its /health answering 200.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swap_duration = Histogram(
            "corral_model_swap_seconds",
            "Time a model load took on corral serve's model host, from taking it up to the "
            "instance serving, including draining and stopping the instances it evicted.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._supervisors: OrderedDict[str, _SupervisorCounts] = OrderedDict()
        scheduler.listeners.append(self._on_event)

    def observe_supervisors(self, instances: Iterable[Instance]) -> None:
        """Count what each instance's supervisor did since its last report: launches,
        restarts, failed runs, and the startup time of each new ready."""
        for instance in instances:
            data = instance.supervisor
            if data is None:
                continue
            now = _SupervisorCounts(data.launches, data.restarts, data.failed_runs, data.readies)
            last = self._supervisors.pop(instance.id, None) or _SupervisorCounts()
            if now.launches < last.launches:
                last = _SupervisorCounts()  # a new supervisor behind the same id
            self._supervisors[instance.id] = now
            while len(self._supervisors) > SUPERVISORS_REMEMBERED:
                self._supervisors.popitem(last=False)
            model = instance.model
            for counter, grown in (
                (self.instance_starts, now.launches - last.launches),
                (self.instance_restarts, now.restarts - last.restarts),
                (self.instance_failures, now.failed_runs - last.failed_runs),
            ):
                if grown > 0:
                    counter.labels(model).inc(grown)
            new_readies = now.readies - last.readies
            if new_readies > 0:
                for seconds in data.startup_seconds[-new_readies:]:
                    if seconds >= 0:
                        self.startup_duration.labels(model).observe(seconds)

    def _on_event(self, event: dict[str, Any]) -> None:
        """Scheduler events: the model host's ``loaded`` carries the swap time."""
        if event.get("type") == "model" and event.get("event") == "loaded":
            seconds = event.get("seconds")
            if isinstance(seconds, int | float):
                self.swap_duration.labels(str(event.get("model", ""))).observe(seconds)
