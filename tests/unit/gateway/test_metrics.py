"""gateway.metrics: names, labels, buckets, the cheap hot path, multi-process rendering."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import DROP_REASONS, EngineStats, Metrics, adapter_label, render

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_observe_request(metrics: Metrics) -> None:
    metrics.observe_request("base", None, "ok", 100, 11, 0.05, 1.05, 0.002)
    metrics.observe_request("base", None, "ok", 50, 1, 0.02, 0.03, 0.001)
    metrics.observe_request("base", "sql", "error", 10, 0, None, 0.2, 0.0)
    none = {"model": "base", "adapter": "none"}
    assert value(metrics, "retort_requests_total", **none, status="ok") == 2
    assert value(metrics, "retort_requests_total", model="base", adapter="sql", status="error") == 1
    assert value(metrics, "retort_prompt_tokens_total", **none) == 150
    assert value(metrics, "retort_completion_tokens_total", **none) == 12
    assert value(metrics, "retort_cost_usd_total", **none) == pytest.approx(0.003)
    assert value(metrics, "retort_request_duration_seconds_count", **none) == 2
    assert value(metrics, "retort_time_to_first_token_seconds_count", **none) == 2
    assert value(metrics, "retort_time_to_first_token_seconds_sum", **none) == pytest.approx(0.07)
    # TPOT: (1.05 - 0.05) / (11 - 1) = 0.1; the one-token request has none.
    assert value(metrics, "retort_time_per_output_token_seconds_count", **none) == 1
    assert value(metrics, "retort_time_per_output_token_seconds_sum", **none) == pytest.approx(0.1)
    # No first token: no TTFT observation for the adapter.
    sql = {"model": "base", "adapter": "sql"}
    assert value(metrics, "retort_time_to_first_token_seconds_count", **sql) == 0
    assert value(metrics, "retort_request_duration_seconds_count", **sql) == 1


def test_buckets_fit_llm_latencies(metrics: Metrics) -> None:
    metrics.observe_request("m", None, "ok", 1, 1, 0.001, 0.01, 0.0)
    text = render(metrics.registry).decode()
    assert 'retort_request_duration_seconds_bucket{adapter="none",le="120.0",model="m"}' in text
    assert 'retort_request_duration_seconds_bucket{adapter="none",le="0.01",model="m"}' in text
    assert 'retort_time_to_first_token_seconds_bucket{adapter="none",le="0.001",model="m"}' in text
    assert 'retort_time_to_first_token_seconds_bucket{adapter="none",le="30.0",model="m"}' in text


def test_every_metric_is_exported_with_units_in_names(metrics: Metrics) -> None:
    names = {f.name for f in text_string_to_metric_families(render(metrics.registry).decode())}
    expected = {
        "retort_requests", "retort_request_duration_seconds", "retort_time_to_first_token_seconds",
        "retort_time_per_output_token_seconds", "retort_prompt_tokens", "retort_completion_tokens",
        "retort_cost_usd", "retort_inflight_requests", "retort_adapter_load_seconds",
        "retort_adapters_loaded", "retort_promptlog_queue_depth", "retort_promptlog_written",
        "retort_promptlog_dropped", "retort_engine_running_requests",
        "retort_engine_waiting_requests", "retort_engine_kv_cache_usage_ratio",
        "retort_engine_start_seconds",
    }  # fmt: skip
    assert expected <= names
    for reason in DROP_REASONS:  # exported at 0 from the start
        assert value(metrics, "retort_promptlog_dropped_total", reason=reason) == 0


def test_key_label_is_optional(metrics: Metrics) -> None:
    metrics.observe_request("m", None, "ok", 1, 1, 0.1, 0.2, 0.5, key_id="team-a")
    assert value(metrics, "retort_requests_total", model="m", adapter="none", status="ok") == 1
    keyed = Metrics(CollectorRegistry(), key_label=True)
    keyed.observe_request("m", "a", "ok", 3, 1, 0.1, 0.2, 0.5, key_id="team-a")
    keyed.observe_request("m", "a", "ok", 3, 1, 0.1, 0.2, 0.5)
    labels = {"model": "m", "adapter": "a"}
    assert value(keyed, "retort_requests_total", **labels, status="ok", key_id="team-a") == 1
    assert value(keyed, "retort_requests_total", **labels, status="ok", key_id="none") == 1
    assert value(keyed, "retort_cost_usd_total", **labels, key_id="team-a") == 0.5
    assert value(keyed, "retort_prompt_tokens_total", **labels, key_id="team-a") == 3
    assert value(keyed, "retort_request_duration_seconds_count", **labels) == 2


def test_inflight_adapters_and_promptlog(metrics: Metrics) -> None:
    metrics.request_started("m")
    metrics.request_started("m")
    metrics.request_finished("m")
    assert value(metrics, "retort_inflight_requests", model="m") == 1
    metrics.observe_adapter_load("sql", 0.4)
    metrics.set_adapters_loaded(3)
    assert value(metrics, "retort_adapter_load_seconds_count", adapter="sql") == 1
    assert value(metrics, "retort_adapters_loaded") == 3
    metrics.promptlog_written(5)
    metrics.promptlog_dropped("queue_full", 2)
    metrics.promptlog_dropped("other")
    metrics.set_promptlog_queue_depth(7)
    assert value(metrics, "retort_promptlog_written_total") == 5
    assert value(metrics, "retort_promptlog_dropped_total", reason="queue_full") == 2
    assert value(metrics, "retort_promptlog_dropped_total", reason="other") == 1
    assert value(metrics, "retort_promptlog_queue_depth") == 7
    assert adapter_label(None) == "none"
    assert adapter_label("sql") == "sql"


def test_engine_gauges_come_from_the_callback() -> None:
    stats = [EngineStats(running=3, waiting=2, kv_cache_usage=0.25)]
    m = Metrics(CollectorRegistry(), engine_stats=lambda: stats[0])
    text = m.render().decode()
    assert "retort_engine_running_requests 3.0" in text
    assert "retort_engine_waiting_requests 2.0" in text
    assert "retort_engine_kv_cache_usage_ratio 0.25" in text

    def broken() -> EngineStats:
        raise RuntimeError("engine gone")

    m.engine_stats = broken
    assert b"retort_engine_running_requests 3.0" in m.render()  # a scrape never fails


WORKER = """
from prometheus_client import CollectorRegistry
from gateway.metrics import Metrics
m = Metrics(CollectorRegistry())
m.observe_request("m", None, "ok", 10, 5, 0.1, 0.5, 0.01)
m.request_started("m")
m.promptlog_dropped("queue_full", 2)
"""
SCRAPE = "import sys; from gateway.metrics import render; sys.stdout.write(render().decode())"


def test_multiprocess_mode_aggregates_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT) for _ in "ab"]
    assert all(w.wait(60) == 0 for w in workers)
    out = subprocess.run(
        [sys.executable, "-c", SCRAPE], env=env, cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
    }
    ok = (("adapter", "none"), ("model", "m"), ("status", "ok"))
    assert samples[("retort_requests_total", ok)] == 2
    assert samples[("retort_promptlog_dropped_total", (("reason", "queue_full"),))] == 4
    assert samples[("retort_inflight_requests", (("model", "m"),))] == 2
    assert samples[("retort_prompt_tokens_total", (("adapter", "none"), ("model", "m")))] == 20


def test_settings_are_documented() -> None:
    from gateway.metrics import MetricsSettings
    from tests.unit.gateway.promptlog.docs import undocumented_fields

    assert undocumented_fields(MetricsSettings) == []
    assert not MetricsSettings().key_label


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in m.registry.collect()
        for s in f.samples
        if not s.name.endswith("_created")
    }


def _direct() -> Metrics:
    m = Metrics(CollectorRegistry())
    m.batched = False  # every value written through, as in multi-process mode
    return m


def test_tallied_requests_export_what_one_observe_per_value_gives() -> None:
    from gateway.metrics import REQUEST_DURATION_BUCKETS, TTFT_BUCKETS

    tallied, direct = Metrics(CollectorRegistry()), _direct()
    assert tallied.batched
    # Every bucket bound exactly, just above it, zero, past the last bound, and NaN.
    latencies = [0.0, 1e-6, 200.0, float("nan")]
    latencies += [*REQUEST_DURATION_BUCKETS, *TTFT_BUCKETS]
    latencies += [b * 1.0001 for b in REQUEST_DURATION_BUCKETS]
    for i, latency in enumerate(latencies):
        ttft = None if i % 5 == 0 else latency / (1 + i % 3)
        args = ("m", "a" if i % 2 else None, "error" if i % 7 == 0 else "ok", i, i % 4)
        call = (*args, ttft, latency, 0.001 * (i % 3), None, "chat" if i % 3 else "completions")
        for m in (tallied, direct):
            m.request_started("m")
            if i % 4:
                m.request_finished("m")
            m.observe_request(*call)
    got, want = _samples(tallied), _samples(direct)
    assert got.keys() == want.keys()
    assert any(name.endswith("_bucket") and v for (name, _), v in got.items())
    for key, v in want.items():
        assert got[key] == pytest.approx(v, nan_ok=True), key
    assert got == pytest.approx(_samples(tallied), nan_ok=True)  # a second scrape adds nothing


def test_each_scrape_sees_every_request_finished_before_it(metrics: Metrics) -> None:
    labels = {"model": "m", "adapter": "none", "status": "ok"}
    metrics.request_started("m")
    metrics.request_finished("m")
    assert value(metrics, "retort_inflight_requests", model="m") == 0  # exported, at 0
    metrics.request_finished("m")
    metrics.request_started("m")
    for n in (1, 2, 3):
        metrics.request_started("m")
        metrics.observe_request("m", None, "ok", 2, 3, 0.01, 0.02, 0.0, endpoint="chat")
        assert value(metrics, "retort_requests_total", **labels) == n
        assert value(metrics, "retort_endpoint_requests_total", endpoint="chat", status="ok") == n
        assert value(metrics, "retort_completion_tokens_total", model="m", adapter="none") == 3 * n
        assert value(metrics, "retort_inflight_requests", model="m") == n
    assert b'retort_requests_total{adapter="none",model="m",status="ok"} 3.0' in metrics.render()


def test_requests_tallied_from_threads_while_scraped_are_all_counted(metrics: Metrics) -> None:
    import threading

    def worker() -> None:
        for _ in range(2000):
            metrics.request_started("m")
            metrics.observe_request("m", None, "ok", 1, 2, 0.01, 0.02, 0.0)
            metrics.request_finished("m")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        metrics.render()
    for t in threads:
        t.join()
    assert value(metrics, "retort_requests_total", model="m", adapter="none", status="ok") == 8000
    assert (
        value(metrics, "retort_request_duration_seconds_count", model="m", adapter="none") == 8000
    )
    assert value(metrics, "retort_prompt_tokens_total", model="m", adapter="none") == 8000
    assert value(metrics, "retort_inflight_requests", model="m") == 0
