"""Percentiles and the small summaries the report tables are made of."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.loadgen import RequestResult

DASH = "\u2013"  # shown for a value that does not exist (no data)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Latency and TTFT percentiles (seconds) and counts of one set of requests."""

    count: int
    errors: int
    p50: float
    p90: float
    p99: float
    mean: float
    ttft_p50: float
    ttft_p99: float
    tokens: float  # mean completion tokens per successful request
    cached: float  # mean cached prompt tokens per successful request

    @classmethod
    def of(cls, results: Sequence[RequestResult]) -> Summary:
        ok = [r for r in results if r.ok]
        latencies = [r.latency for r in ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
        cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
        return cls(
            count=len(results),
            errors=len(results) - len(ok),
            p50=percentile(latencies, 50),
            p90=percentile(latencies, 90),
            p99=percentile(latencies, 99),
            mean=sum(latencies) / len(latencies) if latencies else math.nan,
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            tokens=sum(tokens) / len(tokens) if tokens else math.nan,
            cached=sum(cached) / len(cached) if cached else math.nan,
        )


def ms(seconds: float, digits: int = 2) -> str:
    """Seconds as a millisecond string; an en dash for NaN."""
    if math.isnan(seconds):
        return DASH
    return f"{seconds * 1000:.{digits}f}"


def signed_ms(seconds: float, digits: int = 2) -> str:
    if math.isnan(seconds):
        return DASH
    return f"{seconds * 1000:+.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """A percentile of one sample minus the same percentile of another, with a 95%
    bootstrap interval (seconds)."""

    value: float
    low: float
    high: float

    @property
    def above_zero(self) -> bool:
        """True when the whole interval is above zero: a real, measurable addition."""
        return self.low > 0


def percentile_difference(
    a: Sequence[float], b: Sequence[float], q: float, resamples: int = 1000, seed: int = 0
) -> Difference:
    """``percentile(a, q) - percentile(b, q)`` with a percentile-bootstrap 95% interval."""
    if not a or not b:
        return Difference(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a), np.asarray(b)
    da = np.percentile(rng.choice(xa, (resamples, xa.size)), q, axis=1)
    db = np.percentile(rng.choice(xb, (resamples, xb.size)), q, axis=1)
    low, high = np.percentile(da - db, [2.5, 97.5])
    return Difference(percentile(a, q) - percentile(b, q), float(low), float(high))


def ratio(numerator: Difference, denominator: Difference) -> str:
    """How many times ``denominator`` the ``numerator`` is, as "12x", honest about noise.

    "≈ 0" when the numerator's interval reaches zero (nothing measurable added); a
    lower bound "≥ Nx" (against the top of its interval) when the denominator's does."""
    if math.isnan(numerator.value) or math.isnan(denominator.value):
        return DASH
    if not numerator.above_zero:
        return "≈ 0"
    if not denominator.above_zero:
        return f"≥ {numerator.value / denominator.high:.0f}x" if denominator.high > 0 else DASH
    return _times(numerator.value / denominator.value)


def _times(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"
