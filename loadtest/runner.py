"""Closed-loop load: ``concurrency`` workers each send the next request as soon as one ends.

Every level sends the same work list (prompts, adapter picks, cross-talk probes) to each
target. With a baseline (``vs``), targets alternate within each repetition, and the order
flips from one repetition to the next, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.client import make_client, send_request
from loadtest.dataset import (
    PROBE_PROMPT,
    AdapterMix,
    Endpoint,
    Prompt,
    build_body,
    load_prompts,
    parse_adapter_mix,
)
from loadtest.stats import LevelMetrics, RequestResult, compute_level, ratios

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LoadTestConfig", "LoadTestError", "LoadTestResult", "run", "run_loadtest"]

Work = list[tuple[dict[str, Any], bool]]


class LoadTestError(RuntimeError):
    """The load test cannot run (target unreachable, every warm-up request failed...)."""


@dataclass(slots=True)
class LoadTestConfig:
    """One load test. ``vs`` adds a baseline target that gets the same work, alternately."""

    url: str
    """Base URL of the target, e.g. ``http://127.0.0.1:8000``."""
    model: str | None = None
    """Model name sent in requests; ``None`` takes the first one ``/v1/models`` lists."""
    adapter_mix: str | None = None
    """``a:0.5,b:0.5``: model names picked per request with these weights."""
    concurrency: list[int] = field(default_factory=lambda: [1])
    """Concurrency levels, run in order."""
    num_requests: int = 64
    """Requests per level (and per repetition), cross-talk probes included."""
    dataset: str = "synthetic"
    """``synthetic`` or a JSONL file with ``prompt`` or ``messages`` per line."""
    max_tokens: int = 64
    ignore_eos: bool = True
    """Ask for exactly ``max_tokens`` per answer (``ignore_eos`` + ``min_tokens``)."""
    stream: bool = True
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    endpoint: Endpoint = "chat"
    temperature: float = 0.0
    warmup: int = 2
    """Requests sent to each target before measuring, discarded."""
    vs: str | None = None
    """Base URL of a baseline target; ratios are target / baseline."""
    name: str = "target"
    vs_name: str = "baseline"
    repeats: int = 1
    """Runs of each level per target; results are pooled."""
    crosstalk_copies: int = 4
    """Requests per level that carry the fixed greedy probe prompt (0: no check)."""
    timeout_s: float = 300.0
    """Per-request timeout."""
    max_level_s: float | None = None
    """Stop sending new requests in a level after this many seconds."""
    seed: int = 0
    progress: bool = True


@dataclass(slots=True)
class LoadTestResult:
    config: dict[str, Any]
    model: str
    targets: dict[str, str]
    levels: list[LevelMetrics]
    ratios: dict[int, dict[str, float]]
    started_at: str

    def level(self, target: str, concurrency: int) -> LevelMetrics:
        for lv in self.levels:
            if lv.target == target and lv.concurrency == concurrency:
                return lv
        raise KeyError((target, concurrency))

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model": self.model,
            "targets": self.targets,
            "started_at": self.started_at,
            "levels": [lv.to_dict() for lv in self.levels],
            "ratios": {str(c): r for c, r in self.ratios.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadTestResult:
        return cls(
            config=data["config"],
            model=data["model"],
            targets=data["targets"],
            levels=[LevelMetrics.from_dict(lv) for lv in data["levels"]],
            ratios={int(c): r for c, r in data.get("ratios", {}).items()},
            started_at=data["started_at"],
        )


async def _discover_model(client: httpx.AsyncClient) -> str:
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise LoadTestError(f"cannot list models at {client.base_url}: {exc}") from exc


def _work(
    cfg: LoadTestConfig, prompts: list[Prompt], mix: AdapterMix, model: str, level: int
) -> Work:
    """The level's requests in send order; evenly spaced ones are cross-talk probes.

    Probes replace dataset prompts (they are load like any other request), at most half of
    them; fewer than two probes could not disagree, so none are sent then.
    """
    rng = random.Random(cfg.seed * 1_000_003 + level)

    def body(name: str, prompt: Prompt) -> dict[str, Any]:
        return build_body(
            cfg.endpoint,
            name,
            prompt,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            stream=cfg.stream,
            ignore_eos=cfg.ignore_eos,
        )

    work: Work = [(body(mix.pick(rng), p), False) for p in prompts]
    n = len(work)
    copies = min(cfg.crosstalk_copies, n // 2)
    if copies >= 2:
        probe = body(model, Prompt(text=PROBE_PROMPT)) | {"temperature": 0.0}
        for k in range(copies):
            work[(k * n) // copies] = (probe, True)
    return work


async def _run_work(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    work: Work,
    concurrency: int,
    max_s: float | None,
    on_done: Callable[[RequestResult], None],
) -> tuple[list[RequestResult], float]:
    items = iter(work)
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    stop_at = t0 + max_s if max_s is not None else float("inf")

    async def worker() -> None:
        for body, probe in items:
            if time.perf_counter() > stop_at:
                return
            result = await send_request(client, endpoint, body, clock_zero=t0, probe=probe)
            results.append(result)
            on_done(result)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(work))))))
    return results, time.perf_counter() - t0


async def _warmup(
    client: httpx.AsyncClient, cfg: LoadTestConfig, work: Work, target: str, concurrency: int
) -> None:
    if cfg.warmup <= 0:
        return
    results, _ = await _run_work(
        client, cfg.endpoint, work[: cfg.warmup], concurrency, cfg.max_level_s, lambda _: None
    )
    if not any(r.ok for r in results):
        raise LoadTestError(f"every warm-up request to {target} failed: {results[0].error}")


async def _measure(
    progress: Progress,
    label: str,
    client: httpx.AsyncClient,
    cfg: LoadTestConfig,
    work: Work,
    concurrency: int,
) -> tuple[list[RequestResult], float]:
    """One timed run of ``work`` with a progress bar."""
    task = progress.add_task(label, total=len(work), errors=0)
    failed = 0

    def done(r: RequestResult) -> None:
        nonlocal failed
        failed += not r.ok
        progress.update(task, advance=1, errors=failed)

    return await _run_work(client, cfg.endpoint, work, concurrency, cfg.max_level_s, done)


async def run_loadtest(cfg: LoadTestConfig) -> LoadTestResult:
    """Run every level against the target (and the baseline), and compute the metrics."""
    if not cfg.concurrency or min(cfg.concurrency) < 1 or cfg.num_requests < 1:
        raise LoadTestError("concurrency levels and num_requests must be positive")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    targets = {cfg.name: cfg.url}
    if cfg.vs is not None:
        targets[cfg.vs_name] = cfg.vs
    connections = max(cfg.concurrency)
    clients = {t: make_client(url, connections, cfg.timeout_s) for t, url in targets.items()}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[errors]} errors"),
        console=Console(stderr=True),
        disable=not cfg.progress,
    )
    try:
        model = cfg.model or await _discover_model(clients[cfg.name])
        mix = (
            parse_adapter_mix(cfg.adapter_mix) if cfg.adapter_mix else AdapterMix((model,), (1.0,))
        )
        prompts = load_prompts(cfg.dataset, cfg.num_requests, cfg.seed)
        levels: list[LevelMetrics] = []
        with progress:
            for target, client in clients.items():
                first = _work(cfg, prompts, mix, model, 0)
                await _warmup(client, cfg, first, target, min(cfg.warmup, connections))
            for level in cfg.concurrency:
                work = _work(cfg, prompts, mix, model, level)
                pooled: dict[str, list[RequestResult]] = {t: [] for t in targets}
                elapsed = dict.fromkeys(targets, 0.0)
                for rep in range(cfg.repeats):
                    order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                    for target in order:
                        label = f"{target} c={level}" + (f" #{rep + 1}" if cfg.repeats > 1 else "")
                        results, secs = await _measure(
                            progress, label, clients[target], cfg, work, level
                        )
                        pooled[target].extend(results)
                        elapsed[target] += secs
                levels.extend(
                    compute_level(
                        target,
                        level,
                        pooled[target],
                        elapsed[target],
                        slo_ttft_ms=cfg.slo_ttft_ms,
                        slo_tpot_ms=cfg.slo_tpot_ms,
                    )
                    for target in targets
                )
    finally:
        for client in clients.values():
            await client.aclose()
    result = LoadTestResult(
        config=asdict(cfg),
        model=model,
        targets=targets,
        levels=levels,
        ratios={},
        started_at=started_at,
    )
    if cfg.vs is not None:
        result.ratios = {
            c: ratios(result.level(cfg.name, c), result.level(cfg.vs_name, c))
            for c in cfg.concurrency
        }
    return result


def run(cfg: LoadTestConfig) -> LoadTestResult:
    """Synchronous :func:`run_loadtest`."""
    return asyncio.run(run_loadtest(cfg))
