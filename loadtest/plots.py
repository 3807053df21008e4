"""PNG charts (matplotlib's Agg canvas, no pyplot state): latency, throughput, comparison,
start-up times."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from loadtest.stats import metric

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.axes import Axes

    from loadtest.runner import LoadTestResult
    from loadtest.stats import LevelMetrics

__all__ = ["plot_comparison", "plot_latency", "plot_starts", "plot_throughput"]

_PERCENTILES = (("p50", "-"), ("p90", "--"), ("p99", ":"))
_LATENCY = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_ms"))
_THROUGHPUT = (
    ("requests/s", "request_throughput"),
    ("output tokens/s", "output_throughput"),
    ("goodput (requests/s in SLO)", "goodput"),
)
_COMPARED = (
    ("TTFT p50 (ms)", "ttft_ms.p50"),
    ("TTFT p99 (ms)", "ttft_ms.p99"),
    ("TPOT p50 (ms)", "tpot_ms.p50"),
    ("E2E p50 (ms)", "e2e_ms.p50"),
    ("E2E p99 (ms)", "e2e_ms.p99"),
    ("requests/s", "request_throughput"),
    ("output tokens/s", "output_throughput"),
    ("goodput (req/s)", "goodput"),
)


def _series(result: LoadTestResult, target: str) -> list[LevelMetrics]:
    return sorted(
        (lv for lv in result.levels if lv.target == target), key=lambda lv: lv.concurrency
    )


def _concurrency_axis(ax: Axes, levels: list[int]) -> None:
    if len(levels) > 1 and max(levels) / min(levels) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrency")
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_latency(result: LoadTestResult, out: Path) -> Path:
    """Latency percentiles vs concurrency, one panel per metric, one colour per target."""
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, attr) in zip(axes, _LATENCY, strict=True):
        for colour, target in enumerate(result.targets):
            series = _series(result, target)
            xs = [lv.concurrency for lv in series]
            for pct, style in _PERCENTILES:
                ys = [getattr(getattr(lv, attr), pct) for lv in series]
                ax.plot(xs, ys, style, marker="o", color=f"C{colour}", label=f"{target} {pct}")
            _concurrency_axis(ax, xs)
        ax.set_title(title)
        ax.set_ylabel("ms")
    axes[0].legend(fontsize="small")
    return _save(fig, out / "latency_vs_concurrency.png")


def plot_throughput(result: LoadTestResult, out: Path) -> Path:
    """Request, token and goodput throughput vs concurrency."""
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for ax, (title, attr) in zip(axes, _THROUGHPUT, strict=True):
        for colour, target in enumerate(result.targets):
            series = _series(result, target)
            xs = [lv.concurrency for lv in series]
            ax.plot(
                xs,
                [getattr(lv, attr) for lv in series],
                marker="o",
                color=f"C{colour}",
                label=target,
            )
            _concurrency_axis(ax, xs)
        ax.set_title(title)
    axes[0].legend(fontsize="small")
    return _save(fig, out / "throughput_vs_concurrency.png")


def plot_comparison(result: LoadTestResult, out: Path) -> Path:
    """Side-by-side bars of the key metrics per concurrency level, target vs baseline."""
    names = list(result.targets)
    levels = sorted(result.ratios)
    fig = Figure(figsize=(14, 6.5))
    axes = fig.subplots(2, 4).ravel()
    width = 0.8 / len(names)
    x = np.arange(len(levels))
    for ax, (title, key) in zip(axes, _COMPARED, strict=True):
        for i, target in enumerate(names):
            values = [metric(result.level(target, c), key) for c in levels]
            ax.bar(
                x + (i - (len(names) - 1) / 2) * width, values, width, label=target, color=f"C{i}"
            )
        ax.set_xticks(x, [f"c={c}" for c in levels])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, out / "comparison.png")


def plot_starts(results: list[dict[str, Any]], out: Path) -> Path:
    """Start-up benchmark (``loadtest.startup_bench``): seconds to ``/ready`` of each start,
    one row per variant, prestarted starts filled, spawned ones hollow, cold ones as x."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fig = Figure(figsize=(8, 1.2 + 0.6 * len(variants)))
    ax = fig.add_subplot()
    for row, variant in enumerate(variants):
        for r in (r for r in results if r["variant"] == variant):
            if r.get("start") == "cold":
                ax.plot(r["ready_s"], row, "x", color="tab:red", ms=8)
            elif r.get("prestarted"):
                ax.plot(r["ready_s"], row, "o", color="tab:blue", ms=7)
            else:
                ax.plot(r["ready_s"], row, "o", mfc="none", color="tab:gray", ms=7)
        warm = [
            r["ready_s"] for r in results if r["variant"] == variant and r.get("start") != "cold"
        ]
        if warm:
            ax.plot([float(np.median(warm))] * 2, [row - 0.3, row + 0.3], "-", color="black")
    ax.set_yticks(range(len(variants)), variants)
    ax.set_ylim(-0.6, len(variants) - 0.4)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds from `retort serve` to 200 on /ready (bar: median of warm starts)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("start-up: filled = engine core prestarted, hollow = spawned, x = cold")
    return _save(fig, out)
