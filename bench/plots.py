"""PNG plots for the report (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

if TYPE_CHECKING:
    from bench.workloads.overhead import Cell, Pair
    from bench.workloads.readiness import Trial

COLORS = {
    "direct": "#444444",
    "corral": "#1f77b4",
    "router": "#ff7f0e",
    "litellm": "#d62728",
    "nginx": "#2ca02c",
    "passthrough": "#9467bd",
}


def _ecdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def overhead_plots(
    docs_dir: Path,
    cells: list[Cell],
    results: dict[str, dict[str, Pair]],
    labels: dict[str, str],
) -> list[Path]:
    """Latency distributions (ECDF per cell) and added latency (bars)."""
    from bench.workloads.overhead import added

    docs_dir.mkdir(parents=True, exist_ok=True)
    if not results:
        return []
    images = []

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, cell in zip(axes.flat, cells, strict=False):
        for name, by_cell in results.items():
            ok = by_cell[cell.key].front.ok
            if not ok:
                continue
            xs, ys = _ecdf([r.latency * 1000 for r in ok])
            ax.step(xs, ys, where="post", label=labels[name], color=COLORS.get(name))
        ax.set_xscale("log")
        ax.set_title(cell.label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
        ax.axhline(0.99, color="grey", lw=0.5, ls=":")
    for ax in axes[1]:
        ax.set_xlabel("latency, ms (log scale)")
    axes[0][0].legend(loc="lower right", fontsize="small")
    fig.suptitle("Overhead workload: latency distribution through each system (ECDF)")
    fig.tight_layout()
    path = docs_dir / "bench-overhead-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    images.append(path)

    proxies = [n for n in results if n != "direct"] or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / max(1, len(proxies))
    for ax, stat in zip(axes, ("p50", "p99"), strict=True):
        for i, name in enumerate(proxies):
            diffs = [getattr(added(results[name][c.key]), stat) for c in cells]
            values = [d.value * 1000 for d in diffs]
            errors = [
                [max(0.0, (d.value - d.low) * 1000) for d in diffs],
                [max(0.0, (d.high - d.value) * 1000) for d in diffs],
            ]
            xs = [j + (i - (len(proxies) - 1) / 2) * width for j in range(len(cells))]
            ax.bar(
                xs,
                values,
                width,
                yerr=errors,
                capsize=2,
                label=labels[name],
                color=COLORS.get(name),
                error_kw={"elinewidth": 0.8},
            )
        ax.set_xticks(range(len(cells)), [c.short for c in cells])
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"added {stat} vs its own llama-server (ms, symlog; 95% CI)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = docs_dir / "bench-overhead-added.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    images.append(path)
    return images


def readiness_plot(docs_dir: Path, trials: list[Trial]) -> list[Path]:
    """Every trial's ready -> first byte (dots) and ready -> request starts on
    llama-server's clock (crosses), one column per system and start kind."""
    from bench.stats import percentile

    names = {"corral": "corral", "router": "router mode"}
    kinds = {"cold": "cold start", "crash": "after SIGKILL", "retry": "retry after SIGKILL"}
    docs_dir.mkdir(parents=True, exist_ok=True)
    columns = [
        (system, kind)
        for kind in kinds
        for system in names
        if any(t.system == system and t.kind == kind for t in trials)
    ]
    if not columns:
        return []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for x, (system, kind) in enumerate(columns):
        picked = [t for t in trials if t.system == system and t.kind == kind]
        color = COLORS.get(system)
        for attr, marker in (("gap", "o"), ("server_gap", "x")):
            values = [v * 1000 for t in picked if not math.isnan(v := getattr(t, attr))]
            offset = -0.12 if marker == "o" else 0.12
            xs = [x + offset + (i - (len(values) - 1) / 2) * 0.012 for i in range(len(values))]
            ax.scatter(xs, values, color=color, marker=marker, s=18, alpha=0.8)
            if values:
                middle = percentile(values, 50)
                ax.hlines(middle, x + offset - 0.1, x + offset + 0.1, color=color, lw=1.5)
    ax.set_xticks(range(len(columns)), [f"{names[s]}\n{kinds[k]}" for s, k in columns])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("ms")
    ax.set_title("Readiness workload: each trial, median as a bar")
    ax.grid(True, axis="y", alpha=0.3)
    handles = [
        Line2D([], [], color="grey", marker=m, ls="", label=text)
        for m, text in (
            ("o", "ready -> first byte (t1 - t0)"),
            ("x", "ready -> request starts, on llama-server's clock"),
        )
    ]
    ax.legend(handles=handles, fontsize="small")
    fig.tight_layout()
    path = docs_dir / "bench-readiness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def load_lines(
    path: Path,
    title: str,
    xlabel: str,
    panels: list[tuple[str, dict[str, list[tuple[float, float]]]]],
) -> list[Path]:
    """Side-by-side panels of one line per series (label -> (x, y) points), log y: a
    figure against offered load. Panels are (y label, series)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panels or not any(points for _, series in panels for points in series.values()):
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for ax, (ylabel, series) in zip(axes[0], panels, strict=True):
        for index, (label, points) in enumerate(series.items()):
            valid = [(x, y) for x, y in points if not math.isnan(y) and y > 0]
            if not valid:
                continue
            xs, ys = zip(*valid, strict=True)
            ax.plot(
                xs,
                ys,
                marker=markers[index % len(markers)],
                color=cycle[index % len(cycle)],
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
