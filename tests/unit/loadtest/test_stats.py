from __future__ import annotations

import json
import math

import pytest

from loadtest.report import json_safe
from loadtest.stats import (
    LevelMetrics,
    RequestResult,
    compute_level,
    crosstalk_ok,
    percentile,
    ratios,
    summarize,
)


def test_percentile_interpolates_linearly() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


def test_summarize_reports_milliseconds() -> None:
    s = summarize([0.001, 0.002, 0.003])
    assert s.count == 3
    assert s.mean == pytest.approx(2.0)
    assert s.p50 == pytest.approx(2.0)
    assert s.p90 == pytest.approx(2.8)
    assert s.p99 == pytest.approx(2.98)
    empty = summarize([])
    assert empty.count == 0
    assert math.isnan(empty.p50)


def test_tpot_excludes_first_token_and_needs_two_tokens() -> None:
    r = RequestResult(model="m", ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=10)
    assert r.tpot_s == pytest.approx(0.1)
    assert RequestResult(model="m", ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=1).tpot_s is None
    plain = RequestResult(
        model="m", ok=True, ttft_s=1.0, e2e_s=1.0, output_tokens=9, streamed=False
    )
    assert plain.tpot_s is None


def _ok(ttft: float, e2e: float, tokens: int, *, model: str = "m") -> RequestResult:
    return RequestResult(
        model=model, ok=True, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens, itl_s=[0.01] * 3
    )


def test_compute_level_throughput_goodput_and_errors() -> None:
    results = [
        _ok(0.1, 1.0, 10),  # TPOT 100 ms
        _ok(0.3, 1.2, 10, model="a"),  # TTFT 300 ms: misses the TTFT SLO
        _ok(0.1, 2.0, 10),  # TPOT 211 ms: misses the TPOT SLO
        RequestResult(model="a", error="HTTP 404: nope", e2e_s=0.01),
        RequestResult(
            model="m", ok=True, ttft_s=0.1, e2e_s=0.55, output_tokens=10, text="x", probe=True
        ),
    ]
    lv = compute_level("t", 4, results, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert lv.num_requests == 5  # the probe is load too
    assert lv.completed == 4
    assert lv.errors == 1
    assert lv.error_messages == ["HTTP 404: nope"]
    assert lv.request_throughput == pytest.approx(2.0)
    assert lv.output_throughput == pytest.approx(20.0)
    assert lv.goodput == pytest.approx(1.0)
    assert lv.total_output_tokens == 40
    assert lv.mean_output_tokens == pytest.approx(10.0)
    assert lv.ttft_ms.p50 == pytest.approx(100.0)
    assert lv.e2e_ms.mean == pytest.approx(1187.5)
    assert lv.tpot_ms.count == 4
    assert lv.itl_ms.count == 9
    assert lv.requests_per_model == {"m": 3, "a": 2}
    assert lv.crosstalk_ok is True
    assert lv.crosstalk_copies == 1


def test_goodput_without_slos_counts_every_success() -> None:
    lv = compute_level("t", 1, [_ok(0.5, 3.0, 5), _ok(0.5, 3.0, 5)], duration_s=4.0)
    assert lv.goodput == lv.request_throughput == pytest.approx(0.5)


def test_crosstalk_detects_a_different_text_or_a_failure() -> None:
    def probe(text: str, ok: bool = True) -> RequestResult:
        return RequestResult(model="m", ok=ok, text=text, probe=True)

    assert crosstalk_ok([]) is None
    assert crosstalk_ok([probe("a b"), probe("a b")]) is True
    assert crosstalk_ok([probe("a b"), probe("a c")]) is False
    assert crosstalk_ok([probe("a b"), probe("a b", ok=False)]) is False


def test_ratios_and_json_round_trip() -> None:
    fast = compute_level("gw", 1, [_ok(0.1, 1.0, 10)], duration_s=1.0)
    slow = compute_level("base", 1, [_ok(0.2, 2.0, 10)], duration_s=2.0)
    r = ratios(fast, slow)
    assert r["ttft_ms.p50"] == pytest.approx(0.5)
    assert r["e2e_ms.p99"] == pytest.approx(0.5)
    assert r["request_throughput"] == pytest.approx(2.0)
    assert r["goodput"] == pytest.approx(2.0)
    empty = compute_level("x", 1, [], duration_s=1.0)
    assert math.isnan(ratios(fast, empty)["ttft_ms.p50"])
    back = LevelMetrics.from_dict(json.loads(json.dumps(json_safe(empty.to_dict()))))
    assert math.isnan(back.ttft_ms.p50)
    assert back.completed == 0
    assert LevelMetrics.from_dict(json.loads(json.dumps(json_safe(fast.to_dict())))) == fast
