"""The metric table of ``docs/metrics.md``, read the same way by every test that checks
something against it."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_metrics() -> dict[str, str]:
    """Metric name (counters with ``_total``) -> type, from docs/metrics.md's table."""
    text = (DOCS / "metrics.md").read_text()
    rows = re.findall(r"^\|\s*`(corral_[a-z_]+)`\s*\|\s*(\w+)\s*\|", text, re.M)
    assert rows, "docs/metrics.md has no metric table"
    return dict(rows)
