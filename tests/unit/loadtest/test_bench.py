"""Benchmark plumbing: server lifecycle, wrk script and output, the Markdown rendering."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from gateway.settings import EngineSettings
from loadtest.bench_report import render, targets
from loadtest.servers import RssSampler, free_port, gateway_spec, running, vllm_server_spec
from loadtest.wrk import lua_script, parse_output, run_wrk

pytestmark = pytest.mark.timeout(60)

WRK_LINE = (
    'WRK_JSON {"requests": 2000, "duration_us": 1000000, "bytes": 1, "connect_errors": 0, '
    '"read_errors": 0, "write_errors": 0, "status_errors": 3, "timeouts": 1, '
    '"mean_us": 450.5, "p50_us": 400, "p90_us": 700, "p99_us": 1500, "max_us": 3000}'
)


def test_wrk_script_and_output() -> None:
    script = lua_script("/v1/completions", {"model": "m", "prompt": "hi"})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = [[{"model":"m","prompt":"hi"}]]' in script
    assert "latency:percentile(99)" in script
    with pytest.raises(ValueError):
        lua_script("/x", {"prompt": "]]"})
    r = parse_output("Running 1s test\n" + WRK_LINE + "\n", connections=4)
    assert r.requests_per_s == pytest.approx(2000.0)
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == (0.4, 0.7, 1.5)
    assert r.errors == 4
    assert r.connections == 4


def test_vllm_server_mirrors_the_gateway_engine_args() -> None:
    spec = vllm_server_spec("vllm", "/m", "name", 1234, EngineSettings())
    argv = " ".join(spec.argv)
    assert "--max-model-len 2048" in argv
    assert "--seed 0" in argv
    assert "--served-model-name name" in argv
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert spec.ready_path == "/health"
    # LoRA is on by default in the gateway: the same slots, rank and LoRA ops on both sides.
    settings = EngineSettings()
    assert settings.enable_lora
    assert "--enable-lora" in spec.argv
    assert f"--max-loras {settings.max_loras}" in argv
    assert f"--max-lora-rank {settings.max_lora_rank}" in argv
    assert spec.env["RETORT_LORA_FAST_OPS"] == "1"
    assert spec.env["RETORT_LORA_COMPILE"] == "1"
    off = vllm_server_spec("vllm", "/m", "name", 1, EngineSettings(enable_lora=False))
    assert "--enable-lora" not in off.argv
    assert "--max-loras" not in off.argv
    # The same AOT compile switch as the gateway's engine: vLLM's default (on) where the
    # plugin makes its artifact loadable, off with engine.aot_cache: false.
    assert "VLLM_USE_AOT_COMPILE" not in off.env
    assert off.env["RETORT_AOT_LOAD"] == "1"
    no_aot = vllm_server_spec("vllm", "/m", "name", 1, EngineSettings(aot_cache=False))
    assert no_aot.env["VLLM_USE_AOT_COMPILE"] == "0" or shutil.which("nvidia-smi")


def test_running_starts_measures_and_stops_a_real_gateway(tmp_path: Path) -> None:
    config = tmp_path / "fake.yaml"
    config.write_text("engine: {kind: fake}\nmodel: {served_name: fake-model}\n")
    spec = gateway_spec("gw", config, free_port())
    with running([spec], tmp_path / "logs", ready_timeout_s=30) as (server,):
        pid = server.proc.pid
        process_rss, tree_rss = server.rss_bytes()
        assert 10e6 < process_rss <= tree_rss < 1e9
        with RssSampler(server, interval_s=0.01) as sampler:
            if shutil.which("wrk"):
                script = tmp_path / "post.lua"
                body = {"model": "fake-model", "prompt": "a b", "max_tokens": 4}
                script.write_text(lua_script("/v1/completions", body))
                res = run_wrk(server.url, script, connections=2, duration_s=1)
                assert res.requests > 50
                assert res.errors == 0
        assert sampler.peak_process >= process_rss * 0.9
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "logs" / "gw.log").exists()


def _mem(idle: float, load: float) -> dict[str, object]:
    return {
        "server": "gateway-fake",
        "idle": {"process_mb": idle, "tree_mb": idle},
        "load": {"process_mb": load, "tree_mb": load},
        "load_concurrency": 8,
    }


def test_render_targets_from_part_results() -> None:
    run = {"connections": 1, "requests_per_s": 3000.0, "mean_ms": 0.3, "p50_ms": 0.25}
    run |= {"p90_ms": 0.4, "p99_ms": 0.9, "errors": 0}
    overhead = {
        "started_at": "now",
        "commands": {"gateway": "retort serve"},
        "pinned": True,
        "max_tokens": 16,
        "runs": [{"mode": "non-stream", **run}, {"mode": "stream", **run, "p50_ms": 0.7}],
        "memory": [_mem(100.0, 120.0)],
    }
    rows = {r[0]: r for r in targets({"overhead": overhead})}
    assert rows["fake-engine overhead p50, c=1, non-stream"][3] == "met"
    assert rows["fake-engine overhead p50, c=1, stream"][3] == "**missed**"
    assert rows["gateway RSS, fake engine, idle"][1] == "100.0 MB"
    assert rows["… growth under load (c=8)"][1:] == ["20.0 %", "< 10 %", "**missed**"]
    text = render({"overhead": overhead}, {"CPU": "test"}, Path(".bench"))
    assert "| CPU | test |" in text
    assert "## 2. Gateway overhead" in text
    assert "## 1." not in text

    # Sections other benchmarks wrote (adapters, distillation) survive a re-render, in order;
    # the ones this render produces replace their old text.
    previous = (
        "# Benchmarks\n\n## Machine\n\nold\n\n## 2. Gateway overhead (old)\n\nstale\n\n"
        "## 4. LoRA adapters\n\nadapter numbers\n\n## 6. Distillation\n\nstudent numbers\n"
    )
    again = render({"overhead": overhead}, {"CPU": "test"}, Path(".bench"), previous)
    assert "stale" not in again
    assert "| CPU | test |" in again
    two, four, six = (again.index(f"## {n}.") for n in (2, 4, 6))
    assert two < four < six
    assert "adapter numbers" in again
    assert again.rstrip().endswith("student numbers")


def test_render_logging_part() -> None:
    summary = {"p50_off_ms": 0.4, "rps_off": 1900.0, "rps_on": 1600.0, "cpu_off_us": 400.0}
    data = {
        "started_at": "2026-01-01T00:00:00+00:00",
        "seconds": 4,
        "repeats": 5,
        "pinned": True,
        "configs": {"log-on": "promptlog:\n  enabled: true"},
        "runs": [],
        "summary": [
            {
                **summary,
                "mode": "non-stream",
                "p50_on_ms": 0.45,
                "added_ms": 0.05,
                "cpu_on_us": 450.0,
                "added_cpu_us": 50.0,
            },
            {
                **summary,
                "mode": "stream",
                "p50_on_ms": 0.6,
                "added_ms": 0.2,
                "cpu_on_us": 600.0,
                "added_cpu_us": 200.0,
            },
        ],
        "written": 100.0,
        "dropped": 0.0,
        "writer": [
            {
                "dialect": "sqlite",
                "redact": True,
                "records": 10,
                "records_per_s": 2500.0,
                "submit_us": 2.0,
                "dropped": 0,
            },
        ],
        "queue_memory": {
            "bound_bytes": 2**26,
            "accepted": 5,
            "estimated_bytes": 2**25,
            "traced_bytes": 2**25,
        },
    }
    rows = {r[0]: r for r in targets({"logging": data})}
    assert rows["prompt log on vs off: added p50, c=1, non-stream"][3] == "met"
    assert rows["prompt log on vs off: added p50, c=1, stream"][3] == "**missed**"
    assert rows["prompt-log writer, sqlite, redacted"][3] == "met"
    assert rows["prompt-log queue memory when full"][1] == "32.0 MiB"
    md = render({"logging": data}, {"CPU": "x"}, Path(".bench"))
    assert "## 5. Prompt log" in md
    assert "| stream | 0.400 | 0.600 | 0.200 |" in md
