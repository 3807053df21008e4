"""The ``distill_runs`` table: one row per run, keyed by what it distills, with the
watermark of the log it saw (latest ``created`` and matching row count).

A run whose key already has a succeeded run at the same watermark has no new data and is
not started again (:func:`previous_at_watermark`).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa

from retort.db.schema import distill_runs

if TYPE_CHECKING:
    from retort.db.store import PromptStore

__all__ = ["finish_run", "list_runs", "previous_at_watermark", "run_key", "start_run"]


def run_key(adapter: str | None, filters: dict[str, Any]) -> str:
    """What a run distills: the adapter and the dataset filters as configured (a relative
    window such as ``since: 7d`` stays the same string, so a schedule keeps one key)."""
    data = msgspec.json.encode({"adapter": adapter, **filters}, order="sorted")
    return f"{adapter or '-'}:{hashlib.sha256(data).hexdigest()[:12]}"


async def previous_at_watermark(
    store: PromptStore, key: str, watermark: dict[str, Any]
) -> dict[str, Any] | None:
    """The latest succeeded run of ``key`` that saw exactly ``watermark``, if any."""
    stmt = (
        sa.select(distill_runs)
        .where(distill_runs.c.key == key, distill_runs.c.status == "succeeded")
        .order_by(distill_runs.c.id.desc())
        .limit(1)
    )
    async with store.engine.connect() as conn:
        row = (await conn.execute(stmt)).mappings().first()
    if row is None:
        return None
    if (
        row["watermark_count"] == watermark["count"]
        and row["watermark_created"] == watermark["created"]
    ):
        return dict(row)
    return None


async def start_run(
    store: PromptStore,
    *,
    key: str,
    adapter: str | None,
    model: str | None,
    watermark: dict[str, Any],
    out_dir: str,
) -> str:
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    async with store.engine.begin() as conn:
        await conn.execute(
            distill_runs.insert().values(
                run_id=run_id,
                key=key,
                adapter=adapter,
                model=model,
                watermark_created=watermark["created"],
                watermark_count=watermark["count"],
                status="running",
                started=time.time(),
                out_dir=out_dir,
            )
        )
    return run_id


async def finish_run(
    store: PromptStore,
    run_id: str,
    *,
    status: str,
    student_model: str | None = None,
    gate_passed: bool | None = None,
    published: bool | None = None,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            distill_runs.update()
            .where(distill_runs.c.run_id == run_id)
            .values(
                status=status,
                finished=time.time(),
                student_model=student_model,
                gate_passed=gate_passed,
                published=published,
                summary=summary,
                error=error,
            )
        )


async def list_runs(
    store: PromptStore, *, adapter: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Runs, newest first."""
    return await store.list_distill_runs(adapter=adapter, limit=limit)
