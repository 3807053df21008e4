"""The published benchmark (``make bench``, ``python -m loadtest.bench``).

Parts (``--parts``, default both):

- ``compare``: the gateway (vLLM engine in-process) against vLLM's own OpenAI server, same
  model and engine arguments, same machine. Both servers run; the load goes to one at a
  time, alternating per repetition (order flipped every repetition). Streaming chat, greedy.
  Then the RSS of each server (with its engine child processes), idle and at concurrency 8.
- ``overhead``: the gateway with the fake engine (zero token delay) pinned to CPU 0 and
  ``wrk`` pinned to CPU 1: latency at concurrency 1 is the gateway's per-request overhead,
  and requests/s is per core; streaming and not. Then its RSS idle and at concurrency 8.
- ``logging``: the prompt log's cost (:mod:`loadtest.logging_bench`): added latency with
  logging on vs off (the same wrk method), writer throughput, and the full queue's memory.

Each part saves ``<out-dir>/<part>.json`` (plus logs, the loadtest report and charts);
``BENCHMARKS.md`` is rendered from every part JSON present, so one part can be rerun alone.
Every server started is stopped on the way out, and every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml

from loadtest.bench_options import BenchOptions, console, now
from loadtest.bench_report import PARTS, machine_info, render
from loadtest.cli import parse_levels
from loadtest.logging_bench import bench_logging
from loadtest.report import json_safe, write_report
from loadtest.runner import LoadTestConfig, run
from loadtest.servers import (
    RssSampler,
    Server,
    free_port,
    gateway_spec,
    running,
    vllm_server_spec,
)
from loadtest.wrk import WrkError, chat_body, lua_script, require_wrk, run_wrk, wrk_command

__all__ = ["bench_compare", "bench_overhead", "main", "run_bench"]

MEMORY_CONCURRENCY = 8
SERVED_NAME = "bench-model"


def _shell(server: Server) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(server.spec.env.items()))
    return (env + " " if env else "") + shlex.join(server.spec.command())


def _mb(rss: tuple[int, int]) -> dict[str, float]:
    return {"process_mb": rss[0] / 1e6, "tree_mb": rss[1] / 1e6}


def _memory(server: Server, idle: tuple[int, int], sampler: RssSampler) -> dict[str, Any]:
    return {
        "server": server.spec.name,
        "idle": _mb(idle),
        "load": _mb((sampler.peak_process, sampler.peak_tree)),
        "load_concurrency": MEMORY_CONCURRENCY,
    }


def pull_default_model() -> str:
    """The default model's folder (converted once, then cached under ``$RETORT_HOME``)."""
    cmd = [sys.executable, "-m", "gateway.cli", "models", "pull-default"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`retort models pull-default` failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def bench_compare(opts: BenchOptions) -> dict[str, Any]:
    """Gateway vs vLLM's server: the loadtest comparison and both servers' memory."""
    from gateway.settings import EngineSettings  # the gateway's own engine defaults

    out = opts.out_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    model = opts.model or pull_default_model()
    config = out / "gateway.yaml"
    gw_settings = {"model": {"path": model, "served_name": SERVED_NAME}}
    config.write_text(yaml.safe_dump({**gw_settings, "server": {"log_level": "warning"}}))
    specs = [
        gateway_spec("gateway", config, free_port()),
        vllm_server_spec("vllm", model, SERVED_NAME, free_port(), EngineSettings()),
    ]
    console.print("[bold]compare[/bold]: starting the gateway and vLLM's server (minutes)")
    with running(specs, out / "logs", opts.ready_timeout_s) as servers:
        gw, vllm = servers
        idle = {s.spec.name: s.rss_bytes() for s in servers}
        cfg = LoadTestConfig(
            url=gw.url,
            vs=vllm.url,
            name="gateway",
            vs_name="vllm",
            model=SERVED_NAME,
            concurrency=opts.levels,
            num_requests=opts.num_requests,
            max_tokens=opts.max_tokens,
            repeats=opts.repeats,
            warmup=4,
            max_level_s=opts.level_timeout_s,
        )
        result = run(cfg)
        write_report(result, out)
        memory = []
        for server in servers:
            mem_cfg = LoadTestConfig(
                url=server.url,
                model=SERVED_NAME,
                concurrency=[MEMORY_CONCURRENCY],
                num_requests=opts.memory_requests,
                max_tokens=opts.max_tokens,
                warmup=0,
                crosstalk_copies=0,
                max_level_s=opts.level_timeout_s,
                progress=False,
            )
            with RssSampler(server) as sampler:
                run(mem_cfg)
            memory.append(_memory(server, idle[server.spec.name], sampler))
        commands = {s.spec.name: _shell(s) for s in servers}
    commands["gateway config"] = yaml.safe_dump(gw_settings).strip()
    return {
        "started_at": result.started_at,
        "commands": commands,
        "loadtest": result.to_dict(),
        "memory": memory,
    }


def _check_fake(url: str, body: dict[str, Any]) -> None:
    """One request before wrk: it must succeed and produce ``max_tokens`` tokens."""
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    resp.raise_for_status()
    want = f'"completion_tokens":{body["max_tokens"]}'
    if want not in resp.text.replace(" ", ""):
        raise RuntimeError(f"unexpected fake-engine response: {resp.text[:500]}")


def bench_overhead(opts: BenchOptions) -> dict[str, Any]:
    """Gateway overhead and per-core throughput with the fake engine, measured with wrk."""
    require_wrk()
    out = opts.out_dir / "overhead"
    out.mkdir(parents=True, exist_ok=True)
    pin = (os.cpu_count() or 1) >= 2
    server_cpu, wrk_cpu = ("0", "1") if pin else (None, None)
    settings = {
        "engine": {"kind": "fake", "fake_token_delay_s": 0},
        "model": {"served_name": "fake-model"},
        "server": {"log_level": "warning"},
    }
    config = out / "gateway-fake.yaml"
    config.write_text(yaml.safe_dump(settings))
    scripts = {}
    for mode, stream in (("non-stream", False), ("stream", True)):
        scripts[mode] = out / f"post-{mode}.lua"
        body = chat_body(stream, opts.wrk_max_tokens)
        scripts[mode].write_text(lua_script("/v1/chat/completions", body))
    levels = sorted({1, MEMORY_CONCURRENCY, *opts.wrk_levels})
    spec = gateway_spec("gateway-fake", config, free_port(), cpus=server_cpu)
    console.print("[bold]overhead[/bold]: gateway with the fake engine, wrk")
    runs: list[dict[str, Any]] = []
    with running([spec], out / "logs", 120) as (gw,):
        started = gw.rss_bytes()
        for mode, stream in (("non-stream", False), ("stream", True)):
            _check_fake(gw.url, chat_body(stream, opts.wrk_max_tokens))
            run_wrk(gw.url, scripts[mode], MEMORY_CONCURRENCY, 2, wrk_cpu)  # warm-up
        idle = gw.rss_bytes()
        peak = (0, 0)
        for mode in scripts:
            for c in levels:
                console.print(f"  wrk {mode} c={c} for {opts.wrk_seconds} s")
                with RssSampler(gw) as sampler:
                    res = run_wrk(gw.url, scripts[mode], c, opts.wrk_seconds, wrk_cpu)
                if c == MEMORY_CONCURRENCY:
                    peak = (max(peak[0], sampler.peak_process), max(peak[1], sampler.peak_tree))
                runs.append({"mode": mode, **res.to_dict()})
        wrk_example = shlex.join(
            wrk_command(gw.url, scripts["stream"], 1, opts.wrk_seconds, wrk_cpu)
        )
        commands = {"gateway": _shell(gw), "wrk (example)": wrk_example}
    return {
        "started_at": now(),
        "commands": commands | {"gateway config": yaml.safe_dump(settings).strip()},
        "pinned": pin,
        "max_tokens": opts.wrk_max_tokens,
        "runs": runs,
        "memory": [
            {
                "server": "gateway-fake",
                "started": _mb(started),
                "idle": _mb(idle),
                "load": _mb(peak),
                "load_concurrency": MEMORY_CONCURRENCY,
            }
        ],
    }


def run_bench(opts: BenchOptions) -> Path:
    """Run the chosen parts, save their JSON, and render the Markdown report."""
    unknown = set(opts.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    if {"overhead", "logging"} & set(opts.parts):
        require_wrk()  # fail before spending minutes on the other part
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    runners = {"compare": bench_compare, "overhead": bench_overhead, "logging": bench_logging}
    for part in PARTS:
        if part in opts.parts:
            data = runners[part](opts) | {"options": asdict(opts)}
            path = opts.out_dir / f"{part}.json"
            path.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n")
    results = {}
    for part in PARTS:
        path = opts.out_dir / f"{part}.json"
        if path.exists():
            results[part] = json.loads(path.read_text())
    previous = opts.output.read_text() if opts.output.is_file() else ""
    opts.output.write_text(render(results, machine_info(), opts.out_dir, previous))
    return opts.output


_D = BenchOptions()


def _csv(values: list[Any]) -> str:
    return ",".join(map(str, values))


def bench(
    parts: Annotated[
        str, typer.Option(envvar="BENCH_PARTS", help="Any of: compare,overhead,logging.")
    ] = _csv(_D.parts),
    levels: Annotated[str, typer.Option(envvar="BENCH_LEVELS")] = _csv(_D.levels),
    num_requests: Annotated[int, typer.Option(envvar="BENCH_NUM_REQUESTS", min=1)] = (
        _D.num_requests
    ),
    repeats: Annotated[int, typer.Option(envvar="BENCH_REPEATS", min=1)] = _D.repeats,
    max_tokens: Annotated[int, typer.Option(envvar="BENCH_MAX_TOKENS", min=2)] = _D.max_tokens,
    memory_requests: Annotated[int, typer.Option(envvar="BENCH_MEMORY_REQUESTS", min=1)] = (
        _D.memory_requests
    ),
    wrk_levels: Annotated[str, typer.Option(envvar="BENCH_WRK_LEVELS")] = _csv(_D.wrk_levels),
    wrk_seconds: Annotated[int, typer.Option(envvar="BENCH_WRK_SECONDS", min=1)] = _D.wrk_seconds,
    wrk_max_tokens: Annotated[int, typer.Option(envvar="BENCH_WRK_MAX_TOKENS", min=1)] = (
        _D.wrk_max_tokens
    ),
    logging_seconds: Annotated[int, typer.Option(envvar="BENCH_LOGGING_SECONDS", min=1)] = (
        _D.logging_seconds
    ),
    logging_repeats: Annotated[int, typer.Option(envvar="BENCH_LOGGING_REPEATS", min=1)] = (
        _D.logging_repeats
    ),
    pg_url: Annotated[str | None, typer.Option(envvar="BENCH_PG_URL")] = None,
    model: Annotated[str | None, typer.Option(envvar="BENCH_MODEL")] = None,
    out_dir: Annotated[Path, typer.Option(envvar="BENCH_OUT_DIR")] = _D.out_dir,
    output: Annotated[Path, typer.Option(envvar="BENCH_OUTPUT")] = _D.output,
    ready_timeout: Annotated[float, typer.Option(envvar="BENCH_READY_TIMEOUT")] = (
        _D.ready_timeout_s
    ),
    level_timeout: Annotated[float, typer.Option(envvar="BENCH_LEVEL_TIMEOUT")] = (
        _D.level_timeout_s
    ),
) -> None:
    """Run the published benchmark and write BENCHMARKS.md (every option reads a BENCH_* env)."""
    opts = BenchOptions(
        parts=[p.strip() for p in parts.split(",") if p.strip()],
        levels=parse_levels(levels),
        num_requests=num_requests,
        repeats=repeats,
        max_tokens=max_tokens,
        memory_requests=memory_requests,
        wrk_levels=parse_levels(wrk_levels),
        wrk_seconds=wrk_seconds,
        wrk_max_tokens=wrk_max_tokens,
        logging_seconds=logging_seconds,
        logging_repeats=logging_repeats,
        pg_url=pg_url,
        model=model,
        out_dir=out_dir,
        output=output,
        ready_timeout_s=ready_timeout,
        level_timeout_s=level_timeout,
    )
    try:
        path = run_bench(opts)
    except (WrkError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {path} (raw data and charts in {opts.out_dir}/)")


def main() -> None:
    typer.run(bench)


if __name__ == "__main__":
    main()
