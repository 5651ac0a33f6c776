"""Recent traffic per model, for the dashboard: requests, errors and latency over the
last minutes in fixed time buckets.

Prometheus holds the long history (``corral_request_duration_seconds`` and friends);
this is the short one a person looks at without a Prometheus server: ``window``
seconds (5 minutes) cut into ``bucket_seconds`` (10 s) buckets. Each bucket counts
requests and errors (status 5xx, and 429 and 504: the fleet could not serve them) and
keeps a sample of at most ``samples`` durations and times to first token (reservoir
sampling: every request has the same chance to be kept), from which percentiles are
read. Memory is bounded by models x buckets x samples, whatever the request rate, and
models by ``max_models``: names past it (a client asking for many unknown models) are
counted together as ``(other)``.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Statuses that count as the fleet failing a request; 4xx other than these are the
#: client's mistakes.
FLEET_ERRORS = frozenset({429, 504})


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class _Sample:
    """A reservoir of at most ``size`` values out of ``seen``."""

    size: int
    seen: int = 0
    values: list[float] = field(default_factory=list)

    def add(self, value: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = value


@dataclass
class _Bucket:
    start: float
    samples: int
    requests: int = 0
    errors: int = 0
    durations: _Sample = field(init=False)
    ttfts: _Sample = field(init=False)

    def __post_init__(self) -> None:
        self.durations = _Sample(self.samples)
        self.ttfts = _Sample(self.samples)


class RecentTraffic:
    """Per-model request counts and latency samples over a sliding window."""

    def __init__(
        self,
        *,
        bucket_seconds: float = 10.0,
        window: float = 300.0,
        samples: int = 256,
        max_models: int = 200,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        if bucket_seconds <= 0 or window < bucket_seconds:
            raise ValueError("need 0 < bucket_seconds <= window")
        self.bucket_seconds = bucket_seconds
        self.window = window
        self.samples = samples
        self.max_models = max_models
        self.clock = clock
        self._rng = random.Random(seed)
        self._models: dict[str, deque[_Bucket]] = {}

    def _bucket_start(self, now: float) -> float:
        return math.floor(now / self.bucket_seconds) * self.bucket_seconds

    def _prune(self, buckets: deque[_Bucket], now: float) -> None:
        oldest = self._bucket_start(now) - self.window + self.bucket_seconds
        while buckets and buckets[0].start < oldest:
            buckets.popleft()

    def record(self, model: str, status: int, duration: float, ttft: float | None = None) -> None:
        """Count one finished request (``model`` may be empty: unrouted requests)."""
        now = self.clock()
        name = model or "(none)"
        if name not in self._models and len(self._models) >= self.max_models:
            name = "(other)"
        buckets = self._models.setdefault(name, deque())
        start = self._bucket_start(now)
        if not buckets or buckets[-1].start != start:
            buckets.append(_Bucket(start, self.samples))
            self._prune(buckets, now)
        bucket = buckets[-1]
        bucket.requests += 1
        if status >= 500 or status in FLEET_ERRORS:
            bucket.errors += 1
        bucket.durations.add(duration, self._rng)
        if ttft is not None:
            bucket.ttfts.add(ttft, self._rng)

    def summary(self) -> dict[str, Any]:
        """Per model: a series of buckets (oldest first, empty ones included) and the
        window's totals, rate (requests/s over the last minute) and percentiles."""
        now = self.clock()
        current = self._bucket_start(now)
        count = round(self.window / self.bucket_seconds)
        starts = [current - (count - 1 - i) * self.bucket_seconds for i in range(count)]
        models: dict[str, Any] = {}
        for model, buckets in list(self._models.items()):
            self._prune(buckets, now)
            if not buckets:
                del self._models[model]
                continue
            by_start = {b.start: b for b in buckets}
            series = []
            durations: list[float] = []
            ttfts: list[float] = []
            for start in starts:
                bucket = by_start.get(start)
                if bucket is None:
                    series.append({"t": start, "requests": 0, "errors": 0, "p50": None})
                    continue
                durations.extend(bucket.durations.values)
                ttfts.extend(bucket.ttfts.values)
                series.append(
                    {
                        "t": start,
                        "requests": bucket.requests,
                        "errors": bucket.errors,
                        "p50": percentile(bucket.durations.values, 0.5),
                    }
                )
            # the last minute, including the bucket under way (the elapsed part of it)
            minute = [b for b in buckets if b.start > current - 60.0]
            span = max(now - (current - 60.0 + self.bucket_seconds), self.bucket_seconds)
            models[model] = {
                "series": series,
                "requests": sum(b.requests for b in buckets),
                "errors": sum(b.errors for b in buckets),
                "rate": sum(b.requests for b in minute) / min(span, 60.0),
                "p50": percentile(durations, 0.5),
                "p95": percentile(durations, 0.95),
                "ttft_p50": percentile(ttfts, 0.5),
                "ttft_p95": percentile(ttfts, 0.95),
            }
        return {
            "time": now,
            "bucket_seconds": self.bucket_seconds,
            "window_seconds": self.window,
            "models": models,
        }
