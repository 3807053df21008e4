"""The overview's numbers: rates over the last hour, per model and adapter, from the gateway's
own metrics (its Prometheus registry, read in process; no Prometheus server needed).

:class:`Sampler` snapshots the request, token, cost, latency and TTFT metrics every
``interval_s`` and keeps an hour of snapshots; rates are differences between snapshots.
TTFT percentiles are interpolated from the histogram buckets, as Prometheus'
``histogram_quantile`` does. Charts are small server-rendered SVG sparklines.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["Sampler", "Series", "SeriesStats", "Snapshot", "quantile", "sparkline"]

WINDOW_S = 3600.0
INTERVAL_S = 10.0

Series = tuple[str, str]
"""(model, adapter label): ``adapter`` is ``"none"`` for the base model or a student."""


@dataclass
class _Point:
    requests: float = 0.0
    errors: float = 0.0
    completion_tokens: float = 0.0
    cost_usd: float = 0.0
    latency_sum: float = 0.0
    latency_count: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative counts by upper bound (``le``), ``inf`` included."""


@dataclass
class Snapshot:
    t: float
    series: dict[Series, _Point]


def read_metrics(metrics: Metrics) -> dict[Series, _Point]:
    """Current cumulative values per (model, adapter), summed over status and key."""
    out: dict[Series, _Point] = {}

    def point(labels: dict[str, str]) -> _Point:
        key = (labels.get("model", ""), labels.get("adapter", "none"))
        p = out.get(key)
        if p is None:
            p = out[key] = _Point()
        return p

    for family in metrics.registry.collect():
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if name == "retort_requests_total":
                p = point(labels)
                p.requests += value
                if labels.get("status") != "ok":
                    p.errors += value
            elif name == "retort_completion_tokens_total":
                point(labels).completion_tokens += value
            elif name == "retort_cost_usd_total":
                point(labels).cost_usd += value
            elif name == "retort_request_duration_seconds_sum":
                point(labels).latency_sum += value
            elif name == "retort_request_duration_seconds_count":
                point(labels).latency_count += value
            elif name == "retort_time_to_first_token_seconds_bucket":
                le = float(labels["le"])
                b = point(labels).ttft_buckets
                b[le] = b.get(le, 0.0) + value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative ``buckets`` (``None`` when empty)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    counts = [buckets[b] for b in bounds]
    i = bisect.bisect_left(counts, rank)
    i = min(i, len(bounds) - 1)
    upper = bounds[i]
    if math.isinf(upper):
        return bounds[i - 1] if i > 0 else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = counts[i - 1] if i > 0 else 0.0
    in_bucket = counts[i] - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def _delta(new: _Point, old: _Point | None) -> _Point:
    if old is None:
        return new
    return _Point(
        requests=new.requests - old.requests,
        errors=new.errors - old.errors,
        completion_tokens=new.completion_tokens - old.completion_tokens,
        cost_usd=new.cost_usd - old.cost_usd,
        latency_sum=new.latency_sum - old.latency_sum,
        latency_count=new.latency_count - old.latency_count,
        ttft_buckets={le: c - old.ttft_buckets.get(le, 0.0) for le, c in new.ttft_buckets.items()},
    )


@dataclass
class SeriesStats:
    model: str
    adapter: str
    requests: int
    errors: int
    req_per_s: float
    tokens_per_s: float
    cost_per_hour: float
    latency_mean_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    spark_req_per_s: list[float]
    spark_tokens_per_s: list[float]
    spark_cost_per_hour: list[float]
    spark_ttft_p95_s: list[float | None]


class Sampler:
    """An hour of metric snapshots, taken every ``interval_s`` (a lifespan task)."""

    def __init__(
        self, metrics: Metrics | None, interval_s: float = INTERVAL_S, window_s: float = WINDOW_S
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.window_s = window_s
        self.snapshots: deque[Snapshot] = deque(maxlen=int(window_s / interval_s) + 2)

    def sample(self, now: float | None = None) -> Snapshot | None:
        if self.metrics is None:
            return None
        snap = Snapshot(time.time() if now is None else now, read_metrics(self.metrics))
        self.snapshots.append(snap)
        return snap

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def stats(self, now: float | None = None) -> list[SeriesStats]:
        """Per series over the window: totals, rates and sparkline points (one per interval)."""
        if self.metrics is None:
            return []
        now = time.time() if now is None else now
        current = Snapshot(now, read_metrics(self.metrics))
        snaps = [s for s in self.snapshots if s.t >= now - self.window_s and s.t < now]
        snaps.append(current)
        first = snaps[0]
        span = max(current.t - first.t, 1e-9)
        out: list[SeriesStats] = []
        for key in sorted(current.series):
            total = _delta(current.series[key], first.series.get(key) if len(snaps) > 1 else None)
            sp_req: list[float] = []
            sp_tok: list[float] = []
            sp_cost: list[float] = []
            sp_ttft: list[float | None] = []
            for a, b in itertools.pairwise(snaps):
                dt = max(b.t - a.t, 1e-9)
                d = _delta(b.series.get(key, _Point()), a.series.get(key))
                sp_req.append(d.requests / dt)
                sp_tok.append(d.completion_tokens / dt)
                sp_cost.append(d.cost_usd / dt * 3600.0)
                sp_ttft.append(quantile(0.95, d.ttft_buckets))
            out.append(
                SeriesStats(
                    model=key[0],
                    adapter=key[1],
                    requests=round(total.requests),
                    errors=round(total.errors),
                    req_per_s=total.requests / span if len(snaps) > 1 else 0.0,
                    tokens_per_s=total.completion_tokens / span if len(snaps) > 1 else 0.0,
                    cost_per_hour=total.cost_usd / span * 3600.0 if len(snaps) > 1 else 0.0,
                    latency_mean_s=(
                        total.latency_sum / total.latency_count if total.latency_count else None
                    ),
                    ttft_p50_s=quantile(0.5, total.ttft_buckets),
                    ttft_p95_s=quantile(0.95, total.ttft_buckets),
                    spark_req_per_s=sp_req,
                    spark_tokens_per_s=sp_tok,
                    spark_cost_per_hour=sp_cost,
                    spark_ttft_p95_s=sp_ttft,
                )
            )
        return out

    @property
    def covered_s(self) -> float:
        """How much of the window the snapshots cover (the console may be younger)."""
        if not self.snapshots:
            return 0.0
        return min(self.window_s, time.time() - self.snapshots[0].t)


def sparkline(values: list[float | None], *, width: int = 160, height: int = 32) -> str:
    """An SVG polyline's ``points`` for ``values`` (gaps for ``None``), scaled to the box.

    Returns "" with fewer than two points. Only numbers are written: safe in a template.
    """
    pts = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if len(values) < 2 or not pts:
        return ""
    top = max(v for _, v in pts) or 1.0
    n = len(values) - 1
    return " ".join(
        f"{i / n * width:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in pts
    )
