"""Gateway overhead, A/B (``python -m loadtest.overhead_ab --baseline DIR``): the fake-engine
gateway of this checkout against the one of another checkout (e.g. ``main``), loaded one at a
time by wrk, alternating, several repetitions; as BENCHMARKS.md section 2 (gateway pinned to
CPU 0, wrk to CPU 1, 16 tokens, prompt log off), plus the server's CPU time per request
(user + system, all threads), which load from other processes inflates less than latency.

Writes ``.bench/overhead_ab.json`` and prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from loadtest.servers import ServerSpec, free_port, running
from loadtest.wrk import lua_script, require_wrk, run_wrk

__all__ = ["main"]


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--baseline", type=Path, required=True, help="checkout to compare against")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--out", type=Path, default=Path(".bench/overhead_ab.json"))
    args = p.parse_args(argv)
    require_wrk()
    work = Path(tempfile.mkdtemp(prefix="retort-overhead-ab-"))
    cfg = work / "gateway.yaml"
    cfg.write_text(
        json.dumps(
            {
                "home": str(work / "home"),
                "engine": {"kind": "fake", "fake_token_delay_s": 0},
                "model": {"served_name": "fake-model"},
                "promptlog": {"enabled": False},
                "server": {"log_level": "warning"},
            }
        )
    )
    scripts = {}
    for mode in ("non-stream", "stream"):
        body = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 16,
            "stream": mode == "stream",
        }
        scripts[mode] = work / f"{mode}.lua"
        scripts[mode].write_text(lua_script("/v1/chat/completions", body))
    checkouts = {"new": Path.cwd(), "baseline": args.baseline.resolve()}
    specs = []
    for name, root in checkouts.items():
        argv_ = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)]
        port = free_port()
        argv_ += ["--port", str(port), "--host", "127.0.0.1"]
        # `cd` into the checkout so that its `gateway` package is the one imported.
        cmd = ["bash", "-c", f'cd "{root}" && PYTHONPATH="{root}" exec "$@"', "_", *argv_]
        specs.append(ServerSpec(name, cmd, port, "/ready", {}, "0"))
    levels = [int(x) for x in args.levels.split(",")]
    runs: list[dict[str, Any]] = []
    with running(specs, work / "logs", 120) as servers:
        for srv in servers:
            for mode in scripts:
                run_wrk(srv.url, scripts[mode], 8, 2, "1")  # warm-up
        for rep in range(args.repeats):
            order = servers if rep % 2 == 0 else list(reversed(servers))
            for mode in scripts:
                for c in levels:
                    for srv in order:
                        cpu0 = _cpu_s(srv.proc.pid)
                        res = run_wrk(srv.url, scripts[mode], c, args.seconds, "1")
                        cpu = _cpu_s(srv.proc.pid) - cpu0
                        runs.append(
                            {
                                "server": srv.spec.name,
                                "mode": mode,
                                "c": c,
                                "rep": rep,
                                **res.to_dict(),
                                "cpu_us_per_req": 1e6 * cpu / max(res.requests, 1),
                            }
                        )
    table = ["| mode | conc. | server | req/s | p50 ms | p90 ms | CPU µs/req | errors |"]
    table.append("|---|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for mode in scripts:
        for c in levels:
            for name in checkouts:
                sel = [r for r in runs if (r["mode"], r["c"], r["server"]) == (mode, c, name)]
                med = {
                    k: statistics.median(r[k] for r in sel)
                    for k in ("requests_per_s", "p50_ms", "p90_ms", "cpu_us_per_req")
                }
                errors = sum(r["errors"] for r in sel)
                summary[f"{name}/{mode}/c={c}"] = {**med, "errors": errors}
                table.append(
                    f"| {mode} | {c} | {name} | {med['requests_per_s']:,.0f} | "
                    f"{med['p50_ms']:.3f} | {med['p90_ms']:.3f} | "
                    f"{med['cpu_us_per_req']:.0f} | {errors} |"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print("\n".join(table))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
