"""The load generator against the real gateway app (fake engine) over loopback HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loadtest.cli import loadtest
from loadtest.runner import LoadTestConfig, LoadTestError, run_loadtest
from tests.unit.loadtest.conftest import ADAPTER

pytestmark = pytest.mark.timeout(60)


async def test_streaming_levels_count_every_request_and_token(gateway_url: str) -> None:
    cfg = LoadTestConfig(
        url=gateway_url, concurrency=[1, 4], num_requests=12, max_tokens=7, progress=False
    )
    result = await run_loadtest(cfg)
    assert result.model == "fake-model"  # discovered from /v1/models
    assert [lv.concurrency for lv in result.levels] == [1, 4]
    for lv in result.levels:
        assert lv.completed == lv.num_requests == 12
        assert lv.errors == 0
        assert lv.total_output_tokens == 12 * 7
        assert lv.mean_output_tokens == 7
        assert lv.crosstalk_ok is True
        assert lv.crosstalk_copies == 4
        assert lv.request_throughput == pytest.approx(12 / lv.duration_s)
        assert lv.output_throughput == pytest.approx(84 / lv.duration_s)
        assert lv.goodput == pytest.approx(lv.request_throughput)
        assert lv.ttft_ms.count == lv.e2e_ms.count == lv.tpot_ms.count == 12
        assert 0 < lv.ttft_ms.p50 <= lv.e2e_ms.p50 < 1000
        assert lv.ttft_ms.p50 <= lv.ttft_ms.p90 <= lv.ttft_ms.p99
        assert lv.tpot_ms.p50 >= 0
        # 7 text chunks give 6 gaps each (chunks read together may share a timestamp).
        assert lv.itl_ms.count == 12 * 6
        assert lv.requests_per_model == {"fake-model": 12}


async def test_non_streaming_completions(gateway_url: str) -> None:
    cfg = LoadTestConfig(
        url=gateway_url,
        model="fake-model",
        endpoint="completions",
        stream=False,
        concurrency=[3],
        num_requests=6,
        max_tokens=5,
        crosstalk_copies=2,
        progress=False,
    )
    (lv,) = (await run_loadtest(cfg)).levels
    assert lv.completed == 6
    assert lv.total_output_tokens == 30
    assert lv.tpot_ms.count == 0  # undefined without streaming
    assert lv.ttft_ms.count == 6
    assert lv.crosstalk_ok is True


async def test_adapter_mix_and_errors_are_reported(gateway_url: str) -> None:
    cfg = LoadTestConfig(
        url=gateway_url,
        model="fake-model",
        adapter_mix=f"{ADAPTER}:1,missing-adapter:1",
        concurrency=[2],
        num_requests=20,
        max_tokens=3,
        warmup=0,
        progress=False,
    )
    (lv,) = (await run_loadtest(cfg)).levels
    per_model = lv.requests_per_model
    assert set(per_model) == {ADAPTER, "missing-adapter", "fake-model"}
    assert per_model["fake-model"] == lv.crosstalk_copies == 4  # the probes
    assert lv.errors == per_model["missing-adapter"] > 0
    assert lv.completed == per_model[ADAPTER] + 4
    assert lv.num_requests == 20
    assert lv.error_messages
    assert lv.error_messages[0].startswith("HTTP 404")
    assert lv.crosstalk_ok is True  # probes go to the base model


async def test_unreachable_target_fails_clearly() -> None:
    cfg = LoadTestConfig(url="http://127.0.0.1:9", model="m", timeout_s=2, progress=False)
    with pytest.raises(LoadTestError, match="warm-up"):
        await run_loadtest(cfg)


def test_cli_vs_mode_writes_report_charts_and_ratios(gateway_url: str, tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "one two"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    app = typer.Typer()
    app.command()(loadtest)
    out = tmp_path / "out"
    args = ["--url", gateway_url, "--vs", gateway_url, "--name", "gw", "--vs-name", "base"]
    args += ["--concurrency", "1,2", "--num-requests", "6", "--max-tokens", "4", "--quiet"]
    args += ["--dataset", str(dataset), "--slo-ttft-ms", "5000", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    files = {p.name for p in out.iterdir()}
    assert files == {
        "results.json",
        "report.md",
        "latency_vs_concurrency.png",
        "throughput_vs_concurrency.png",
        "comparison.png",
    }
    data = json.loads((out / "results.json").read_text())
    assert data["targets"] == {"gw": gateway_url, "base": gateway_url}
    assert sorted(data["ratios"]) == ["1", "2"]
    assert data["ratios"]["1"]["request_throughput"] > 0
    assert [(lv["target"], lv["completed"]) for lv in data["levels"]] == [
        ("gw", 6),
        ("base", 6),
        ("gw", 6),
        ("base", 6),
    ]
    report = (out / "report.md").read_text()
    assert "## Ratios (gw / base)" in report
    assert "![comparison.png](comparison.png)" in report


def test_cli_rejects_bad_levels() -> None:
    app = typer.Typer()
    app.command()(loadtest)
    res = CliRunner().invoke(app, ["--concurrency", "1,x"])
    assert res.exit_code == 2
