from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import Metrics
from loadtest.servers import Postgres, postgres_server
from retort.db.record import LogRecord
from retort.db.store import PromptStore
from tests.services import service


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with service(postgres_server()) as pg:
        yield pg


async def _create_database(pg: Postgres) -> str:
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg.db_url(name)


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'retort.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return await _create_database(pg)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[PromptStore]:
    s = await PromptStore(store_url).open()
    try:
        yield s
    finally:
        await s.close()


def make_record(i: int = 0, **fields: Any) -> LogRecord:
    base: dict[str, Any] = {
        "request_id": f"req-{i}",
        "created": time.time(),
        "model": "base-model",
        "endpoint": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question {i}?"},
        ],
        "params": {"temperature": 0.7, "max_tokens": 16, "stop": ["\n"]},
        "completion": f"Answer {i}.",
        "finish_reason": "stop",
        "prompt_tokens": 12,
        "completion_tokens": 4,
        "ttft_s": 0.01,
        "latency_s": 0.05,
        "cost_usd": 1e-6,
    }
    base.update(fields)
    return LogRecord(**base)


class BadRowError(Exception):
    """What :class:`Sink` raises for a poison record (a data error, not an outage)."""


class Sink:
    """A fake store: optionally gated, slow, failing, or rejecting a poison record."""

    def __init__(
        self,
        *,
        fail_times: int = 0,
        gate: asyncio.Event | None = None,
        delay_s: float = 0.0,
        poison: str | None = None,
    ) -> None:
        self.fail_times = fail_times
        self.gate = gate
        self.delay_s = delay_s
        self.poison = poison
        self.calls = 0
        self.batches: list[int] = []
        self.records: list[LogRecord] = []

    async def insert_many(self, records: Sequence[LogRecord]) -> int:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_times != 0:
            self.fail_times -= 1
            raise ConnectionRefusedError("database down")
        if self.poison is not None and any(r.request_id == self.poison for r in records):
            raise BadRowError("bad row")
        self.batches.append(len(records))
        self.records.extend(records)
        return len(records)

    @staticmethod
    def is_data_error(error: BaseException) -> bool:
        return isinstance(error, BadRowError)


def metric(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
