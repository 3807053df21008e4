"""Per-request results and the per-level metrics computed from them.

Definitions (as in ``vllm bench serve``, with the first *content* chunk as the first token):

- TTFT: request sent → first chunk carrying text (non-streaming: the whole response).
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, for streamed requests with ≥ 2 tokens.
- ITL: gaps between consecutive text-carrying chunks, pooled over requests.
- E2E: request sent → last byte.
- goodput: requests per second that finished without error and met both SLOs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "RATIO_METRICS",
    "LevelMetrics",
    "RequestResult",
    "Summary",
    "compute_level",
    "crosstalk_ok",
    "metric",
    "percentile",
    "ratios",
    "summarize",
]

MAX_ERROR_MESSAGES = 5


@dataclass(frozen=True, slots=True)
class Summary:
    """Mean and percentiles of one latency metric, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def empty(cls) -> Summary:
        nan = float("nan")
        return cls(nan, nan, nan, nan, 0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Inverse of ``asdict``; ``None`` (NaN in strict JSON) reads back as NaN."""

        def num(key: str) -> float:
            value = data.get(key)
            return float("nan") if value is None else float(value)

        return cls(num("mean"), num("p50"), num("p90"), num("p99"), int(data.get("count", 0)))


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(values_s: list[float]) -> Summary:
    """Summarize durations given in seconds as milliseconds."""
    if not values_s:
        return Summary.empty()
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
    return Summary(float(ms.mean()), p50, p90, p99, len(values_s))


@dataclass(slots=True)
class RequestResult:
    """What one request did. Times are seconds; ``ttft_s`` is ``None`` when no text came."""

    model: str
    ok: bool = False
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    text: str = ""
    streamed: bool = True
    error: str | None = None
    probe: bool = False

    @property
    def tpot_s(self) -> float | None:
        if not self.streamed or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class LevelMetrics:
    """Everything measured for one target at one concurrency level."""

    target: str
    concurrency: int
    num_requests: int
    completed: int
    errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    goodput: float
    total_output_tokens: int
    mean_output_tokens: float
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2e_ms: Summary
    crosstalk_ok: bool | None
    crosstalk_copies: int
    error_messages: list[str] = field(default_factory=list)
    requests_per_model: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelMetrics:
        summaries = {
            k: Summary.from_dict(data[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
        }
        return cls(**{**data, **summaries})


def _meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if not r.ok:
        return False
    if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms


def crosstalk_ok(probes: list[RequestResult]) -> bool | None:
    """True when every probe succeeded with the same text; None when no probe ran."""
    if not probes:
        return None
    return all(p.ok for p in probes) and len({p.text for p in probes}) == 1


def compute_level(
    target: str,
    concurrency: int,
    results: list[RequestResult],
    duration_s: float,
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> LevelMetrics:
    """Aggregate one level. Probes are load like the rest, and feed the cross-talk check."""
    probes = [r for r in results if r.probe]
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in ok)

    def per_s(n: int) -> float:
        return n / duration_s if duration_s > 0 else 0.0

    per_model: dict[str, int] = {}
    for r in results:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return LevelMetrics(
        target=target,
        concurrency=concurrency,
        num_requests=len(results),
        completed=len(ok),
        errors=len(failed),
        duration_s=duration_s,
        request_throughput=per_s(len(ok)),
        output_throughput=per_s(tokens),
        goodput=per_s(sum(_meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in ok)),
        total_output_tokens=tokens,
        mean_output_tokens=tokens / len(ok) if ok else 0.0,
        ttft_ms=summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=summarize([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=summarize([gap for r in ok for gap in r.itl_s]),
        e2e_ms=summarize([r.e2e_s for r in ok]),
        crosstalk_ok=crosstalk_ok(probes),
        crosstalk_copies=len(probes),
        error_messages=[r.error or "unknown error" for r in failed[:MAX_ERROR_MESSAGES]],
        requests_per_model=per_model,
    )


# Metrics compared between two targets: (key, higher_is_better).
RATIO_METRICS: tuple[tuple[str, bool], ...] = (
    ("ttft_ms.p50", False),
    ("ttft_ms.p99", False),
    ("tpot_ms.p50", False),
    ("itl_ms.p50", False),
    ("e2e_ms.p50", False),
    ("e2e_ms.p99", False),
    ("request_throughput", True),
    ("output_throughput", True),
    ("goodput", True),
)


def metric(level: LevelMetrics, key: str) -> float:
    """A metric by dotted name, e.g. ``ttft_ms.p50`` or ``output_throughput``."""
    value: Any = level
    for part in key.split("."):
        value = getattr(value, part)
    return float(value)


def ratios(target: LevelMetrics, baseline: LevelMetrics) -> dict[str, float]:
    """``target / baseline`` for every metric in :data:`RATIO_METRICS` (NaN when undefined)."""
    out: dict[str, float] = {}
    for key, _ in RATIO_METRICS:
        num, den = metric(target, key), metric(baseline, key)
        out[key] = num / den if den and not np.isnan(den) else float("nan")
    return out
