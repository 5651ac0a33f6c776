"""``docs/grafana-dashboard.json`` is a valid dashboard that uses only documented metrics."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.metrics_docs import DOCS, documented_metrics

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def expressions(node: Any) -> list[str]:
    """Every PromQL expression in the dashboard: targets' ``expr`` and variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += expressions(value)
    elif isinstance(node, list):
        for item in node:
            found += expressions(item)
    return found


def metric_of(name: str, documented: dict[str, str]) -> str | None:
    """The documented metric a series name in an expression belongs to."""
    if name in documented:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and documented.get(base) == "histogram":
            return base
    return None


def test_dashboard_is_valid_json_with_panels_that_query_something() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_every_metric_the_dashboard_queries_is_documented() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    documented = documented_metrics()
    used: set[str] = set()
    for expr in expressions(dashboard):
        for name in re.findall(r"\bcorral_[a-z_]+", expr):
            metric = metric_of(name, documented)
            assert metric is not None, f"{name} (in {expr!r}) is not in docs/metrics.md"
            used.add(metric)
    # the panels the dashboard exists for
    assert {
        "corral_slots_busy",
        "corral_slots_total",
        "corral_buffered_requests",
        "corral_responses_total",
        "corral_request_duration_seconds",
        "corral_time_to_first_token_seconds",
        "corral_generated_tokens_total",
        "corral_instance_starts_total",
        "corral_instance_failures_total",
    } <= used


def test_histogram_quantiles_read_buckets_by_le() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    for expr in expressions(dashboard):
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "le" in re.findall(r"by \(([^)]*)\)", expr)[0], expr
