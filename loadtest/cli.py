"""The ``loadtest`` command: a typer function (``retort loadtest``) and ``python -m loadtest``."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loadtest.report import fmt, write_report
from loadtest.runner import LoadTestConfig, LoadTestError, run_loadtest

__all__ = ["EndpointChoice", "loadtest", "main", "parse_levels"]


class EndpointChoice(StrEnum):
    chat = "chat"
    completions = "completions"


def parse_levels(spec: str) -> list[int]:
    """``1,8,32`` -> ``[1, 8, 32]``; every level must be a positive integer."""
    try:
        levels = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"not a list of integers: {spec!r}") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"levels must be positive integers: {spec!r}")
    return levels


def loadtest(
    url: Annotated[str, typer.Option(help="Target base URL.")] = "http://127.0.0.1:8000",
    model: Annotated[
        str | None, typer.Option(help="Model name; default: the first one /v1/models lists.")
    ] = None,
    adapter_mix: Annotated[
        str | None,
        typer.Option(help="Model names picked per request with weights, e.g. `a:0.5,b:0.5`."),
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated concurrency levels, run in order.")
    ] = "1,8,32",
    num_requests: Annotated[
        int, typer.Option(min=1, help="Requests per level, cross-talk probes included.")
    ] = 64,
    dataset: Annotated[
        str, typer.Option(help="`synthetic` or a JSONL file with `prompt` or `messages`.")
    ] = "synthetic",
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos/--no-ignore-eos",
            help="Ask for exactly --max-tokens per answer (vLLM's ignore_eos and min_tokens).",
        ),
    ] = True,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Goodput SLO on TTFT.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Goodput SLO on TPOT.")] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for results.json, report.md and charts.")
    ] = Path("loadtest-results"),
    vs: Annotated[
        str | None,
        typer.Option(help="Baseline base URL: runs alternate, ratios are target/baseline."),
    ] = None,
    endpoint: Annotated[EndpointChoice, typer.Option()] = EndpointChoice.chat,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up requests per target.")] = 2,
    name: Annotated[str, typer.Option(help="Label of the target.")] = "target",
    vs_name: Annotated[str, typer.Option(help="Label of the baseline.")] = "baseline",
    repeats: Annotated[int, typer.Option(min=1, help="Runs of each level per target.")] = 1,
    crosstalk_copies: Annotated[
        int, typer.Option(min=0, help="Requests per level carrying the greedy cross-talk probe.")
    ] = 4,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 300.0,
    max_level_s: Annotated[
        float | None, typer.Option(help="Stop sending new requests in a level after this.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Load-test an OpenAI-compatible server (like `vllm bench serve`) and write a report.

    Exits 3 when a request failed or the cross-talk probe got different texts.
    """
    cfg = LoadTestConfig(
        url=url,
        model=model,
        adapter_mix=adapter_mix,
        concurrency=parse_levels(concurrency),
        num_requests=num_requests,
        dataset=dataset,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        stream=stream,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        endpoint=endpoint.value,
        temperature=temperature,
        warmup=warmup,
        vs=vs,
        name=name,
        vs_name=vs_name,
        repeats=repeats,
        crosstalk_copies=crosstalk_copies,
        timeout_s=timeout,
        max_level_s=max_level_s,
        seed=seed,
        progress=not quiet,
    )
    console = Console(stderr=True)
    try:
        result = asyncio.run(run_loadtest(cfg))
    except (LoadTestError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    write_report(result, out)
    for lv in result.levels:
        console.print(
            f"{lv.target} c={lv.concurrency}: {lv.completed}/{lv.num_requests} ok, "
            f"{fmt(lv.request_throughput)} req/s, {fmt(lv.output_throughput, 1)} tok/s, "
            f"TTFT p50 {fmt(lv.ttft_ms.p50)} ms, TPOT p50 {fmt(lv.tpot_ms.p50)} ms, "
            f"cross-talk {'ok' if lv.crosstalk_ok is not False else 'MISMATCH'}"
        )
    console.print(f"report: {out / 'report.md'}")
    if any(lv.errors for lv in result.levels) or any(
        lv.crosstalk_ok is False for lv in result.levels
    ):
        raise typer.Exit(3)


def main() -> None:
    typer.run(loadtest)
