"""What ``python -m loadtest.bench`` runs (:class:`BenchOptions`), shared by its parts
(:mod:`loadtest.bench`, :mod:`loadtest.logging_bench`) so that neither imports the other's
internals."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from loadtest.bench_report import PARTS

__all__ = ["BenchOptions", "console", "now"]

console = Console(stderr=True)
"""Progress lines go to stderr; reports to files."""


@dataclass(slots=True)
class BenchOptions:
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Concurrency levels of the gateway-vs-vLLM comparison."""
    num_requests: int = 32
    """Requests per level and repetition, per server (cross-talk probes included)."""
    repeats: int = 2
    max_tokens: int = 64
    memory_requests: int = 24
    """Requests of the concurrency-8 run that measures RSS under load (vLLM engine)."""
    wrk_levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    wrk_seconds: int = 10
    wrk_max_tokens: int = 16
    logging_seconds: int = 5
    """wrk seconds per run of the ``logging`` part (each server, mode and repetition)."""
    logging_repeats: int = 3
    pg_url: str | None = None
    """``logging`` part: also measure the writer on this Postgres (``postgresql+asyncpg://``)."""
    model: str | None = None
    """Model folder; default: ``retort models pull-default``."""
    out_dir: Path = Path(".bench")
    output: Path = Path("BENCHMARKS.md")
    ready_timeout_s: float = 600.0
    level_timeout_s: float = 900.0
    """No new requests in a level (one server, one repetition) after this long."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
