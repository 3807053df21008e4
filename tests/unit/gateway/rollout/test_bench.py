"""The rollout benchmark's measures run and say what they measured (speed targets are for
the benchmark itself, not tested here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.rollout.bench import submit_cost


def test_submit_cost_times_each_case(tmp_path: Path) -> None:
    out = asyncio.run(submit_cost(f"sqlite+aiosqlite:///{tmp_path}/b.db", batches=3, batch=10))
    assert set(out) == {"sampled", "not_sampled", "dropped"}
    assert all(0 < v < 1 for v in out.values())
