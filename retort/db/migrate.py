"""Run the prompt log's Alembic migrations from code (``alembic upgrade head``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from filelock import FileLock

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["MIGRATIONS_DIR", "alembic_config", "upgrade"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x7265_746F  # "reto": serializes replicas migrating one Postgres at once


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config built in code, its script location inside this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Held until this transaction commits: a second replica waits, then finds head.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def upgrade(target: str | AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema at ``target`` (a URL or an async engine) to ``revision``.

    SQLite files are migrated under a file lock beside the database, so that several
    worker processes starting at once do not race; Postgres uses an advisory lock.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(target) if isinstance(target, str) else target
    try:
        lock_path = _sqlite_lock_path(engine)
        if lock_path is None:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade, revision)
            return
        import asyncio

        locks = await asyncio.to_thread(_lock_file, str(lock_path))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade, revision)
        finally:
            _unlock_file(*locks)
    finally:
        if isinstance(target, str):
            await engine.dispose()


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _lock_file(path: str) -> tuple[threading.Lock, FileLock]:
    """Lock ``path`` against other processes (file lock) and other tasks of this process
    (a lock per path), so that the file lock is held by one instance at a time."""
    with _THREAD_LOCKS_GUARD:
        local = _THREAD_LOCKS.setdefault(path, threading.Lock())
    local.acquire()
    try:
        flock = FileLock(path, thread_local=False)
        flock.acquire()
    except BaseException:
        local.release()
        raise
    return local, flock


def _unlock_file(local: threading.Lock, flock: FileLock) -> None:
    try:
        flock.release()
    finally:
        local.release()


def _sqlite_lock_path(engine: AsyncEngine) -> Path | None:
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).with_name(Path(db).name + ".migrate.lock")
