"""The store's contract, on SQLite and on a real Postgres."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from retort.db.filters import RowFilter
from retort.db.migrate import upgrade
from retort.db.store import PromptStore
from tests.unit.gateway.promptlog.conftest import make_record

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_migrations_create_the_schema_at_head(store: PromptStore) -> None:
    async with store.engine.connect() as conn:
        version = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
        tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
        indexes = await conn.run_sync(
            lambda c: {i["name"] for i in sa.inspect(c).get_indexes("requests")}
        )
        feedback_columns = await conn.run_sync(
            lambda c: {col["name"] for col in sa.inspect(c).get_columns("feedback")}
        )
    assert version == "0007"
    assert "correction" in feedback_columns
    assert {
        "requests",
        "feedback",
        "distill_runs",
        "responses",
        "shadow",
        "rollouts",
        "rollout_events",
        "alembic_version",
    } <= tables
    assert {"ix_requests_created", "ix_requests_model", "ix_requests_adapter"} <= indexes


async def test_upgrade_is_idempotent_and_safe_to_race(store_url: str) -> None:
    await asyncio.gather(upgrade(store_url), upgrade(store_url), upgrade(store_url))
    async with PromptStore(store_url) as s:
        await s.insert_many([make_record()])
        assert await s.count() == 1


async def test_inserting_a_record_twice_keeps_one_row(store: PromptStore) -> None:
    """Idempotent by ``record_key`` (a replayed spool, a retried batch); a request id a
    client sent twice is two records, and both are kept."""
    first, second = make_record(1), make_record(1)
    assert first.record_key != second.record_key
    await store.insert_many([first])
    await store.insert_many([first, second])
    await store.insert_many([second])
    rows = await store.query(RowFilter(request_id="req-1"))
    assert sorted(r["record_key"] for r in rows) == sorted([first.record_key, second.record_key])


async def test_round_trip_keeps_every_field(store: PromptStore) -> None:
    rec = make_record(
        7,
        key_id="team-a",
        adapter="sql-lora",
        served_by="student",
        messages=[{"role": "user", "content": [{"type": "text", "text": "héllo 日本 🎉"}]}],
        tags={"app": "search", "env": "prod"},
        user="u-1",
        status="error",
        error="engine died",
        finish_reason=None,
        ttft_s=None,
    )
    prompt_rec = make_record(8, endpoint="completions", messages=None, prompt="Once\x00upon")
    assert await store.insert_many([rec, prompt_rec]) == 2
    rows = await store.query()
    assert len(rows) == 2
    got = rows[0]
    assert got["request_id"] == "req-7"
    assert got["key_id"] == "team-a"
    assert got["adapter"] == "sql-lora"
    assert got["served_by"] == "student"
    assert got["messages"] == rec.messages
    assert got["params"] == {"temperature": 0.7, "max_tokens": 16, "stop": ["\n"]}
    assert got["tags"] == {"app": "search", "env": "prod"}
    assert got["user"] == "u-1"
    assert got["status"] == "error"
    assert got["error"] == "engine died"
    assert got["ttft_s"] is None
    assert got["created"] == pytest.approx(rec.created)
    assert got["score"] is None
    assert got["feedback_count"] == 0
    # NUL cannot be stored by Postgres; every backend stores U+FFFD instead.
    assert rows[1]["prompt"] == "Once\ufffdupon"
    assert rows[1]["messages"] is None


async def test_filters(store: PromptStore) -> None:
    now = time.time()
    await store.insert_many(
        [
            make_record(0, created=now - 100, model="a"),
            make_record(1, created=now - 50, model="a", adapter="x"),
            make_record(2, created=now - 10, model="b", adapter="x", status="error"),
            make_record(3, created=now, model="b", served_by="student"),
        ]
    )

    async def ids(**kw: Any) -> list[str]:
        limit = kw.pop("limit", None)
        return [r["request_id"] for r in await store.query(RowFilter(**kw), limit=limit)]

    assert await ids() == ["req-0", "req-1", "req-2", "req-3"]
    assert await ids(model="a") == ["req-0", "req-1"]
    assert await ids(adapter="x") == ["req-1", "req-2"]
    assert await ids(since=now - 50) == ["req-1", "req-2", "req-3"]
    assert await ids(until=now - 10) == ["req-0", "req-1"]
    assert await ids(status="error") == ["req-2"]
    assert await ids(served_by="student") == ["req-3"]
    assert await ids(limit=2) == ["req-0", "req-1"]
    assert await ids(model="b", adapter="x") == ["req-2"]


async def test_feedback_joins_as_mean_score(store: PromptStore) -> None:
    await store.insert_many([make_record(i) for i in range(3)])
    assert await store.add_feedback("req-0", 1.0, "great")
    assert await store.add_feedback("req-0", 0.0)
    assert await store.add_feedback("req-1", 0.9, None)
    assert not await store.add_feedback("unknown", 1.0)
    with pytest.raises(ValueError, match="number"):
        await store.add_feedback("req-2", float("nan"))
    rows = {r["request_id"]: r for r in await store.query()}
    assert rows["req-0"]["score"] == pytest.approx(0.5)
    assert rows["req-0"]["feedback_count"] == 2
    assert rows["req-1"]["score"] == pytest.approx(0.9)
    assert rows["req-2"]["score"] is None
    assert [r["request_id"] for r in await store.query(RowFilter(min_score=0.6))] == ["req-1"]
    assert [r["request_id"] for r in await store.query(RowFilter(min_score=0.5))] == [
        "req-0",
        "req-1",
    ]


async def test_duplicate_request_ids_are_kept(store: PromptStore) -> None:
    # Clients may send their own x-request-id; a repeat must not fail the batch.
    await store.insert_many([make_record(1), make_record(1)])
    assert await store.count() == 2
    assert await store.has_request("req-1")
    assert not await store.has_request("req-2")


async def test_iter_rows_pages_through_everything(store: PromptStore) -> None:
    await store.insert_many([make_record(i) for i in range(25)])
    got = [r["request_id"] async for r in store.iter_rows(page_size=4)]
    assert got == [f"req-{i}" for i in range(25)]
    limited = [r["request_id"] async for r in store.iter_rows(page_size=4, limit=10)]
    assert limited == [f"req-{i}" for i in range(10)]


async def test_purge_older_than(store: PromptStore) -> None:
    now = time.time()
    await store.insert_many(
        [make_record(0, created=now - 10 * 86400), make_record(1, created=now - 3600)]
    )
    await store.add_feedback("req-0", 1.0)
    await store.add_feedback("req-1", 1.0)
    assert await store.purge_older_than(7) == 1
    rows = await store.query()
    assert [r["request_id"] for r in rows] == ["req-1"]
    async with store.engine.connect() as conn:
        left = await conn.scalar(sa.text("SELECT count(*) FROM feedback"))
    assert left == 1


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    async with PromptStore(f"sqlite+aiosqlite:///{tmp_path}/sub/dir/retort.db") as s:
        async with s.engine.connect() as conn:
            mode = await conn.scalar(sa.text("PRAGMA journal_mode"))
        assert mode == "wal"
    assert (tmp_path / "sub/dir/retort.db").exists()


async def test_page_filters_search_and_feedback(store: PromptStore) -> None:
    """The console's traffic view: newest first, a total, text search, rated/unrated."""
    await store.insert_many(
        [
            make_record(0, completion="100% sure_thing"),
            make_record(1, messages=[{"role": "user", "content": "Where is PARIS?"}]),
            make_record(2, prompt="a completion prompt", messages=None, endpoint="completions"),
        ]
    )
    assert await store.add_feedback("req-1", 0.25, "meh", "Paris is in France.")
    rows, total = await store.page(limit=2)
    assert total == 3
    assert [r["request_id"] for r in rows] == ["req-2", "req-1"]
    rows, total = await store.page(offset=2, limit=2, oldest_first=True)
    assert (total, [r["request_id"] for r in rows]) == (3, ["req-2"])

    async def ids(**kw: Any) -> list[str]:
        found, n = await store.page(RowFilter(**kw), oldest_first=True)
        assert n == len(found)
        return [r["request_id"] for r in found]

    assert await ids(search="paris") == ["req-1"]  # case-insensitive, inside messages
    assert await ids(search="100%") == ["req-0"]  # LIKE wildcards are literal
    assert await ids(search="s_re") == []  # not "sure"
    assert await ids(search="completion prompt") == ["req-2"]
    assert await ids(search="req-2") == ["req-2"]
    assert await ids(rated=True) == ["req-1"]
    assert await ids(rated=False) == ["req-0", "req-2"]
    assert await ids(max_score=0.5) == ["req-1"]
    assert await ids(max_score=0.1) == []
    counts = await store.unrated_counts()
    assert [(q["name"], q["n"]) for q in counts["model"]] == [("base-model", 2)]
    assert counts["adapter"] == []
    assert await store.feedback_for("req-1") == [
        {
            "score": 0.25,
            "comment": "meh",
            "correction": "Paris is in France.",
            "created": pytest.approx(time.time(), abs=60),
        }
    ]
