"""RecentTraffic: the dashboard's short history of requests per model."""

from __future__ import annotations

import pytest

from corral.observe.recent import RecentTraffic, percentile


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(list(reversed(values)), 0.99) == 99.0


def test_counts_errors_and_latency_per_model() -> None:
    clock = Clock()
    traffic = RecentTraffic(bucket_seconds=10, window=60, clock=clock)
    for ms in range(1, 11):
        traffic.record("a", 200, ms / 1000, ttft=ms / 2000)
    traffic.record("a", 503, 0.5)
    traffic.record("a", 429, 0.0)
    traffic.record("a", 400, 0.0)  # the client's mistake, not the fleet's
    traffic.record("b", 504, 10.0)
    summary = traffic.summary()
    a, b = summary["models"]["a"], summary["models"]["b"]
    assert a["requests"] == 13 and a["errors"] == 2
    assert b["requests"] == 1 and b["errors"] == 1
    assert a["ttft_p50"] == 0.0025  # only the ten that had a first token
    assert b["p95"] == 10.0 and b["ttft_p50"] is None
    assert len(a["series"]) == 6  # window / bucket, oldest first, the current one last
    assert a["series"][-1]["requests"] == 13
    assert sum(point["requests"] for point in a["series"][:-1]) == 0


def test_buckets_roll_and_old_ones_leave_the_window() -> None:
    clock = Clock(1000.0)
    traffic = RecentTraffic(bucket_seconds=10, window=60, clock=clock)
    traffic.record("a", 200, 0.1)
    clock.now = 1025.0
    traffic.record("a", 200, 0.2)
    traffic.record("a", 200, 0.3)
    series = traffic.summary()["models"]["a"]["series"]
    assert [p["requests"] for p in series] == [0, 0, 0, 1, 0, 2]
    assert series[-1]["t"] == 1020.0 and series[-1]["p50"] == 0.2
    clock.now = 1065.0  # the first bucket (1000) has left the 60 s window
    summary = traffic.summary()["models"]["a"]
    assert summary["requests"] == 2
    clock.now = 1200.0  # everything left: the model is dropped
    assert traffic.summary()["models"] == {}


def test_rate_is_over_the_last_minute() -> None:
    clock = Clock(1000.0)
    traffic = RecentTraffic(bucket_seconds=10, window=300, clock=clock)
    for second in range(120):  # one request a second for two minutes
        clock.now = 1000.0 + second
        traffic.record("a", 200, 0.01)
    clock.now = 1119.999
    rate = traffic.summary()["models"]["a"]["rate"]
    assert rate == pytest.approx(1.0, rel=0.05)
    assert traffic.summary()["models"]["a"]["requests"] == 120


def test_memory_is_bounded_by_the_sample_size() -> None:
    traffic = RecentTraffic(bucket_seconds=10, window=60, samples=16, clock=Clock(), seed=1)
    for i in range(10_000):
        traffic.record("a", 200, i / 10_000)
    bucket = traffic._models["a"][-1]
    assert len(bucket.durations.values) == 16 and bucket.durations.seen == 10_000
    p50 = traffic.summary()["models"]["a"]["p50"]
    assert p50 is not None and 0.2 < p50 < 0.8  # a fair sample, not the first 16


def test_rejects_a_window_shorter_than_a_bucket() -> None:
    with pytest.raises(ValueError):
        RecentTraffic(bucket_seconds=10, window=5)


def test_many_model_names_are_folded_into_other() -> None:
    traffic = RecentTraffic(max_models=3, clock=Clock())
    for i in range(50):
        traffic.record(f"made-up-{i}", 404, 0.001)
    models = traffic.summary()["models"]
    assert len(models) == 4
    assert models["(other)"]["requests"] == 47
