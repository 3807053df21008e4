"""Write a load test's ``results.json``, ``report.md`` and charts into a folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.stats import RATIO_METRICS

if TYPE_CHECKING:
    from loadtest.runner import LoadTestResult
    from loadtest.stats import LevelMetrics

__all__ = ["fmt", "json_safe", "markdown_report", "md_table", "ratio_table", "write_report"]

LATENCY_METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by ``None`` (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table; ``–`` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _crosstalk(lv: LevelMetrics) -> str:
    if lv.crosstalk_ok is None:
        return "–"
    return f"{'ok' if lv.crosstalk_ok else 'MISMATCH'} ({lv.crosstalk_copies})"


def _throughput_table(levels: list[LevelMetrics]) -> str:
    header = ["target", "conc.", "done/sent", "errors", "req/s", "out tok/s", "goodput req/s"]
    header += ["tokens/req", "cross-talk"]
    rows = [
        [
            lv.target,
            str(lv.concurrency),
            f"{lv.completed}/{lv.num_requests}",
            str(lv.errors),
            fmt(lv.request_throughput),
            fmt(lv.output_throughput, 1),
            fmt(lv.goodput),
            fmt(lv.mean_output_tokens, 1),
            _crosstalk(lv),
        ]
        for lv in levels
    ]
    return md_table(header, rows)


def _latency_table(levels: list[LevelMetrics]) -> str:
    header = ["target", "conc.", "metric", "mean ms", "p50 ms", "p90 ms", "p99 ms"]
    rows = []
    for lv in levels:
        for label, attr in LATENCY_METRICS:
            s = getattr(lv, attr)
            rows.append(
                [
                    lv.target,
                    str(lv.concurrency),
                    label,
                    fmt(s.mean),
                    fmt(s.p50),
                    fmt(s.p90),
                    fmt(s.p99),
                ]
            )
    return md_table(header, rows)


def ratio_table(result: LoadTestResult) -> str:
    """Ratios target / baseline per level; < 1 is better for latency, > 1 for throughput."""
    header = ["conc.", *(key for key, _ in RATIO_METRICS)]
    rows = [
        [str(c), *(fmt(r.get(key), 3) for key, _ in RATIO_METRICS)]
        for c, r in sorted(result.ratios.items())
    ]
    return md_table(header, rows)


def markdown_report(result: LoadTestResult, charts: list[str]) -> str:
    cfg = result.config
    targets = ", ".join(f"`{name}` = {url}" for name, url in result.targets.items())
    slo = f"TTFT ≤ {fmt(cfg['slo_ttft_ms'], 0)} ms, TPOT ≤ {fmt(cfg['slo_tpot_ms'], 0)} ms"
    parts = [
        "# Load test report",
        "",
        f"- started: {result.started_at}",
        f"- targets: {targets}",
        f"- model: `{result.model}`"
        + (f", adapter mix `{cfg['adapter_mix']}`" if cfg["adapter_mix"] else ""),
        f"- endpoint: {cfg['endpoint']}, stream: {cfg['stream']}, max_tokens: {cfg['max_tokens']}, "
        f"temperature: {cfg['temperature']}, dataset: {cfg['dataset']}",
        f"- requests per level: {cfg['num_requests']} × {cfg['repeats']} repetition(s), "
        f"warm-up: {cfg['warmup']}, SLOs: {slo}",
        "",
        "## Throughput",
        "",
        _throughput_table(result.levels),
        "",
        "## Latency",
        "",
        _latency_table(result.levels),
    ]
    if result.ratios:
        parts += [
            "",
            f"## Ratios ({next(iter(result.targets))} / {list(result.targets)[1]})",
            "",
            ratio_table(result),
        ]
    errors = [(lv, m) for lv in result.levels for m in lv.error_messages]
    if errors:
        parts += ["", "## First errors", ""]
        parts += [f"- {lv.target} c={lv.concurrency}: `{m}`" for lv, m in errors]
    if charts:
        parts += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
    return "\n".join(parts) + "\n"


def write_report(result: LoadTestResult, out_dir: str | Path) -> list[Path]:
    """Write ``results.json``, the charts and ``report.md``; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(json_safe(result.to_dict()), indent=2) + "\n")
    # matplotlib is imported here, not at module level: `retort serve` (and the vLLM
    # processes it spawns, which re-import the CLI) would pay seconds for it at every start.
    from loadtest.plots import plot_comparison, plot_latency, plot_throughput

    charts = [plot_latency(result, out), plot_throughput(result, out)]
    if result.ratios:
        charts.append(plot_comparison(result, out))
    written += charts
    report = out / "report.md"
    report.write_text(markdown_report(result, [c.name for c in charts]))
    written.append(report)
    return written
