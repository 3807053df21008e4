"""The prompt log's store: SQLAlchemy 2 async over SQLite (aiosqlite, WAL) or Postgres (asyncpg).

``PromptStore(url)``, then ``await store.open()`` (runs the Alembic migrations), or
``async with PromptStore(url) as store``. Rows come back as plain dicts: the record's
fields plus ``score`` (the mean feedback score, ``None`` without feedback) and
``feedback_count``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa
from sqlalchemy import event, exc

from retort.db.filters import RowFilter, select_rows
from retort.db.schema import distill_runs, feedback, requests, responses, shadow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine

    from retort.db.record import LogRecord

__all__ = ["PromptStore", "StoreError"]

_ENCODER = msgspec.json.Encoder()
_TEXT_FIELDS = ("request_id", "key_id", "model", "adapter", "prompt", "completion",
                "finish_reason", "error", "user")  # fmt: skip


class StoreError(RuntimeError):
    """The store cannot be opened (bad URL, missing driver)."""


def _json_dumps(obj: Any) -> str:
    # NUL cannot be stored in Postgres text/jsonb; the same on every backend keeps parity.
    return _ENCODER.encode(obj).decode().replace("\\u0000", "\\ufffd")


def _json_loads(data: str | bytes) -> Any:
    return msgspec.json.decode(data)


def _row(rec: LogRecord) -> dict[str, Any]:
    row = msgspec.structs.asdict(rec)
    for name in _TEXT_FIELDS:
        value = row[name]
        if value is not None and "\x00" in value:
            row[name] = value.replace("\x00", "\ufffd")
    return row


def _check_driver(url: sa.URL) -> None:
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql":
        if driver != "asyncpg":
            raise StoreError(f"use postgresql+asyncpg:// for the prompt log (got {url.drivername})")
        try:
            import asyncpg  # noqa: F401
        except ImportError as e:
            raise StoreError(
                "Postgres needs asyncpg: pip install 'retort-gateway[postgres]'"
            ) from e
    elif backend == "sqlite":
        if driver != "aiosqlite":
            raise StoreError(f"use sqlite+aiosqlite:// for the prompt log (got {url.drivername})")
    else:
        raise StoreError(f"unsupported prompt-log database {backend!r}: use SQLite or Postgres")


class PromptStore:
    """Async store of :class:`LogRecord` rows and feedback. One per process; share it."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        try:
            self.url = sa.make_url(url)
        except exc.ArgumentError as e:
            raise StoreError(f"invalid prompt-log URL: {e}") from e
        _check_driver(self.url)
        self._echo = echo
        self._engine: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("the store is not open: await store.open() first")
        return self._engine

    async def open(self, *, migrate: bool = True) -> PromptStore:
        """Connect and (by default) upgrade the schema to the latest migration."""
        if self._engine is not None:
            return self
        from sqlalchemy.ext.asyncio import create_async_engine

        kwargs: dict[str, Any] = {
            "echo": self._echo,
            "json_serializer": _json_dumps,
            "json_deserializer": _json_loads,
        }
        if self.dialect == "sqlite":
            db = self.url.database
            if db and db != ":memory:" and not db.startswith("file:"):
                await asyncio.to_thread(_ensure_parent, db)
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=5)
        engine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        self._engine = engine
        if migrate:
            from retort.db.migrate import upgrade

            try:
                await upgrade(engine)
            except BaseException:
                self._engine = None
                await engine.dispose()
                raise
        return self

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def __aenter__(self) -> PromptStore:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writes ---------------------------------------------------------------------------

    async def insert_many(self, records: Iterable[LogRecord]) -> int:
        """Insert records in one transaction; returns how many were given. Idempotent: a
        record whose ``record_key`` is already stored is skipped (a replayed spool, a batch
        retried after its commit's answer was lost)."""
        rows = [_row(r) for r in records]
        if not rows:
            return 0
        async with self.engine.begin() as conn:
            await conn.execute(self._insert_requests, rows)
        return len(rows)

    @property
    def _insert_requests(self) -> sa.Insert:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(requests).on_conflict_do_nothing(index_elements=["record_key"])
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(requests).on_conflict_do_nothing(index_elements=["record_key"])

    async def list_distill_runs(
        self, *, adapter: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """``distill_runs`` rows, newest first (``retort distill runs``, the console)."""
        stmt = sa.select(distill_runs).order_by(distill_runs.c.id.desc()).limit(limit)
        if adapter is not None:
            stmt = stmt.where(distill_runs.c.adapter == adapter)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings().all()]

    async def insert_shadow(self, rows: list[dict[str, Any]]) -> int:
        """Store shadow pairs (:class:`gateway.shadow.ShadowPair` rows)."""
        if not rows:
            return 0
        async with self.engine.begin() as conn:
            await conn.execute(shadow.insert(), rows)
        return len(rows)

    async def shadow_pairs(
        self,
        *,
        teacher: str | None = None,
        student: str | None = None,
        request_id: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Stored shadow pairs, newest first."""
        q = sa.select(shadow).order_by(shadow.c.created.desc(), shadow.c.id.desc()).limit(limit)
        if teacher is not None:
            q = q.where(shadow.c.teacher == teacher)
        if student is not None:
            q = q.where(shadow.c.student == student)
        if request_id is not None:
            q = q.where(shadow.c.request_id == request_id)
        async with self.engine.connect() as conn:
            result = await conn.execute(q)
            return [dict(r._mapping) for r in result]

    @staticmethod
    def is_data_error(error: BaseException) -> bool:
        """Whether ``error`` is about the rows themselves (retrying the batch cannot help,
        but inserting its records one by one can save the good ones)."""
        if isinstance(error, exc.IntegrityError | exc.DataError):
            return True
        return isinstance(error, exc.StatementError) and not isinstance(error, exc.DBAPIError)

    async def add_feedback(
        self,
        request_id: str,
        score: float,
        comment: str | None = None,
        correction: str | None = None,
    ) -> bool:
        """Store feedback (and an optional corrected answer) on a logged request;
        ``False`` if no request has that id."""
        if score != score:  # NaN
            raise ValueError("score must be a number")
        async with self.engine.begin() as conn:
            found = await conn.scalar(
                sa.select(sa.literal(1)).where(requests.c.request_id == request_id).limit(1)
            )
            if found is None:
                return False
            await conn.execute(
                feedback.insert().values(
                    request_id=request_id,
                    score=float(score),
                    comment=comment.replace("\x00", "\ufffd") if comment else comment,
                    correction=(correction.replace("\x00", "\ufffd") if correction else correction),
                    created=time.time(),
                )
            )
        return True

    async def purge_older_than(self, days: float, *, now: float | None = None) -> int:
        """Delete requests created more than ``days`` ago, their feedback, and the stored
        responses as old."""
        cutoff = (time.time() if now is None else now) - days * 86400.0
        old_ids = sa.select(requests.c.request_id).where(requests.c.created < cutoff)
        async with self.engine.begin() as conn:
            await conn.execute(feedback.delete().where(feedback.c.request_id.in_(old_ids)))
            await conn.execute(responses.delete().where(responses.c.created < cutoff))
            await conn.execute(shadow.delete().where(shadow.c.created < cutoff))
            result = await conn.execute(requests.delete().where(requests.c.created < cutoff))
        return int(result.rowcount or 0)

    # -- reads ----------------------------------------------------------------------------

    async def iter_rows(
        self, where: RowFilter | None = None, *, limit: int | None = None, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Rows matching ``where`` in insertion order, fetched in pages (for exports of any
        size); at most ``limit``."""
        base = select_rows(where or RowFilter())
        last_id: int | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            stmt = base
            if last_id is not None:
                stmt = stmt.where(requests.c.id > last_id)
            stmt = stmt.order_by(requests.c.id).limit(size)
            async with self.engine.connect() as conn:
                rows = (await conn.execute(stmt)).mappings().all()
            for row in rows:
                out = dict(row)
                last_id = out.pop("id")
                out["feedback_count"] = out["feedback_count"] or 0
                yield out
            if len(rows) < size:
                return
            if remaining is not None:
                remaining -= len(rows)

    async def query(
        self, where: RowFilter | None = None, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Like :meth:`iter_rows`, as a list."""
        return [row async for row in self.iter_rows(where, limit=limit)]

    async def page(
        self,
        where: RowFilter | None = None,
        *,
        offset: int = 0,
        limit: int = 50,
        oldest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of rows matching ``where`` (newest first unless ``oldest_first``) and
        how many match in all: the console's traffic view."""
        base = select_rows(where or RowFilter())
        order = requests.c.id.asc() if oldest_first else requests.c.id.desc()
        stmt = base.order_by(order).offset(max(0, offset)).limit(max(0, limit))
        count = sa.select(sa.func.count()).select_from(base.subquery())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
            total = int(await conn.scalar(count) or 0)
        out = []
        for row in rows:
            d = dict(row)
            d.pop("id")
            d["feedback_count"] = d["feedback_count"] or 0
            out.append(d)
        return out, total

    async def unrated_counts(self) -> dict[str, list[dict[str, Any]]]:
        """Requests without feedback, per adapter and per model (``n``, ``oldest``): the
        console's rating queues."""
        unrated = ~sa.exists().where(feedback.c.request_id == requests.c.request_id)
        out: dict[str, list[dict[str, Any]]] = {}
        async with self.engine.connect() as conn:
            for name, col in (("adapter", requests.c.adapter), ("model", requests.c.model)):
                stmt = (
                    sa.select(
                        col.label("name"),
                        sa.func.count().label("n"),
                        sa.func.min(requests.c.created).label("oldest"),
                    )
                    .where(unrated, col.is_not(None))
                    .group_by(col)
                    .order_by(col)
                )
                out[name] = [dict(r) for r in (await conn.execute(stmt)).mappings().all()]
        return out

    async def feedback_for(self, request_id: str) -> list[dict[str, Any]]:
        """A request's feedback rows, oldest first."""
        stmt = (
            sa.select(
                feedback.c.score, feedback.c.comment, feedback.c.correction, feedback.c.created
            )
            .where(feedback.c.request_id == request_id)
            .order_by(feedback.c.id)
        )
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings().all()]

    async def count(self) -> int:
        """Rows in ``requests``."""
        async with self.engine.connect() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(requests)) or 0)

    async def has_request(self, request_id: str) -> bool:
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                sa.select(sa.literal(1)).where(requests.c.request_id == request_id).limit(1)
            )
        return found is not None


def _ensure_parent(db: str) -> None:
    Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
    finally:
        cursor.close()
