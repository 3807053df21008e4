"""The ``logging`` part of ``make bench``: what the prompt log costs.

- Added latency: two fake-engine gateways (zero token delay), identical but for
  ``promptlog.enabled``, both pinned to CPU 0 and loaded one at a time by ``wrk`` (CPU 1) at
  concurrency 1, alternating (order flipped every repetition). Logging on, every request is
  captured, redacted and written to SQLite by the same process, so the writer's work counts.
  Added latency = median p50 (on) - median p50 (off). The server's CPU time per request
  (user + system, all its threads) is recorded too: unlike latency on a shared machine, it
  does not depend on what else runs there.
- Writer throughput: :func:`gateway.promptlog.bench.writer_throughput` on SQLite (and on
  Postgres: ``BENCH_PG_URL``, else a throwaway durable one on loopback when Debian's
  ``postgresql`` is installed), with and without redaction.
- Queue memory when full: :func:`gateway.promptlog.bench.queue_memory` at the default bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import statistics
import tempfile
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench_options import BenchOptions, console, now
from loadtest.servers import free_port, gateway_spec, postgres_bindir, postgres_server, running
from loadtest.wrk import chat_body, lua_script, require_wrk, run_wrk

if TYPE_CHECKING:
    from collections.abc import Iterator


__all__ = ["SERVERS", "bench_logging"]

SERVERS = ("log-off", "log-on")
MODES = (("non-stream", False), ("stream", True))


def _promptlog_counters(url: str) -> dict[str, float]:
    """``retort_promptlog_written_total`` and the dropped total, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {"written": 0.0, "dropped": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "retort_promptlog_written_total":
                out["written"] += s.value
            elif s.name == "retort_promptlog_dropped_total":
                out["dropped"] += s.value
    return out


def _latency(opts: BenchOptions, out: Any) -> dict[str, Any]:
    pin = (os.cpu_count() or 1) >= 2
    server_cpu, wrk_cpu = ("0", "1") if pin else (None, None)
    specs, configs = [], {}
    for name in SERVERS:
        home = out / name / "home"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        settings = {
            "engine": {"kind": "fake", "fake_token_delay_s": 0},
            "model": {"served_name": "fake-model"},
            "server": {"log_level": "warning"},
            "promptlog": {"enabled": name == "log-on"},
        }
        config = out / f"gateway-{name}.yaml"
        config.write_text(yaml.safe_dump(settings))
        configs[name] = yaml.safe_dump(settings).strip()
        env = {"RETORT_HOME": str(home)}
        specs.append(gateway_spec(name, config, free_port(), cpus=server_cpu, env=env))
    scripts = {}
    for mode, stream in MODES:
        scripts[mode] = out / f"post-{mode}.lua"
        scripts[mode].write_text(lua_script("/v1/chat/completions", chat_body(stream, 16)))
    runs: list[dict[str, Any]] = []
    with running(specs, out / "logs", 120) as servers:
        by_name = {s.spec.name: s for s in servers}
        for server in servers:  # warm-up, and a check that each answers
            for mode, stream in MODES:
                r = httpx.post(
                    server.url + "/v1/chat/completions", json=chat_body(stream, 16), timeout=10
                )
                r.raise_for_status()
                run_wrk(server.url, scripts[mode], 1, 2, wrk_cpu)
        for rep in range(opts.logging_repeats):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for mode, _ in MODES:
                for name in order:
                    proc = psutil.Process(by_name[name].proc.pid)
                    cpu0 = sum(proc.cpu_times()[:2])
                    res = run_wrk(
                        by_name[name].url, scripts[mode], 1, opts.logging_seconds, wrk_cpu
                    )
                    cpu_us = (sum(proc.cpu_times()[:2]) - cpu0) / max(1, res.requests) * 1e6
                    runs.append(
                        {"server": name, "mode": mode, "rep": rep, "cpu_us": cpu_us} | res.to_dict()
                    )
        counters = _promptlog_counters(by_name["log-on"].url)
    summary = []
    for mode, _ in MODES:

        def median(key: str, server: str, mode: str = mode) -> float:
            return statistics.median(
                float(r[key]) for r in runs if r["server"] == server and r["mode"] == mode
            )

        p50 = {name: median("p50_ms", name) for name in SERVERS}
        rps = {name: median("requests_per_s", name) for name in SERVERS}
        cpu = {name: median("cpu_us", name) for name in SERVERS}
        summary.append(
            {
                "mode": mode,
                "p50_off_ms": p50["log-off"],
                "p50_on_ms": p50["log-on"],
                "added_ms": p50["log-on"] - p50["log-off"],
                "rps_off": rps["log-off"],
                "rps_on": rps["log-on"],
                "cpu_off_us": cpu["log-off"],
                "cpu_on_us": cpu["log-on"],
                "added_cpu_us": cpu["log-on"] - cpu["log-off"],
            }
        )
    return {"pinned": pin, "configs": configs, "runs": runs, "summary": summary, **counters}


async def _writer(pg_url: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # The gateway is what is measured: imported when measured, never with loadtest.
    from gateway.promptlog.bench import queue_memory, writer_throughput
    from gateway.promptlog.settings import PromptLogSettings

    logging.disable(logging.ERROR)
    try:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            urls = [f"sqlite+aiosqlite:///{tmp}/bench.db"] + ([pg_url] if pg_url else [])
            for url in urls:
                for redact in (False, True):
                    res = await writer_throughput(url, redact=redact)
                    results.append(msgspec.structs.asdict(res))
        mem = msgspec.structs.asdict(
            await queue_memory(bound_bytes=PromptLogSettings().queue_max_bytes)
        )
    finally:
        logging.disable(logging.NOTSET)
    return results, mem


@contextlib.contextmanager
def _postgres(url: str | None) -> Iterator[str | None]:
    """``url``; else a throwaway durable Postgres on loopback when the Debian
    ``postgresql`` binaries are here; else ``None`` (SQLite only)."""
    if url:
        yield url
        return
    if postgres_bindir() is None:
        yield None
        return
    with postgres_server(durable=True) as pg:
        yield pg.url


def bench_logging(opts: BenchOptions) -> dict[str, Any]:
    """Prompt log on vs off (wrk, fake engine), writer throughput and full-queue memory."""
    require_wrk()
    out = opts.out_dir / "logging"
    out.mkdir(parents=True, exist_ok=True)
    started = now()
    console.print("[bold]logging[/bold]: fake-engine gateways, prompt log on vs off, wrk c=1")
    latency = _latency(opts, out)
    console.print("[bold]logging[/bold]: prompt-log writer throughput and queue memory")
    with _postgres(opts.pg_url) as pg_url:
        writer, memory = asyncio.run(_writer(pg_url))
    return {
        "started_at": started,
        "seconds": opts.logging_seconds,
        "repeats": opts.logging_repeats,
        **latency,
        "writer": writer,
        "queue_memory": memory,
    }
