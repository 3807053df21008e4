"""The batch writer: nothing accepted is lost, nothing dropped is silent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.promptlog.writer import BatchWriter
from loadtest.servers import postgres_server
from retort.db.record import LogRecord
from retort.db.store import PromptStore
from tests import waits
from tests.services import service
from tests.unit.gateway.promptlog.conftest import Sink, make_record, metric
from tests.waits import until

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def test_many_records_all_reach_sqlite(tmp_path: Path, metrics: Metrics) -> None:
    async with PromptStore(f"sqlite+aiosqlite:///{tmp_path}/retort.db") as store:
        writer = BatchWriter(store, batch_size=128, metrics=metrics)
        writer.start()
        n = 3000
        for i in range(n):
            assert writer.submit(make_record(i))
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the writer interleave, as requests would
        await writer.close()
        assert await store.count() == n
        ids = {r["request_id"] async for r in store.iter_rows()}
    assert ids == {f"req-{i}" for i in range(n)}
    assert writer.written == n
    assert not writer.dropped
    assert writer.depth == 0
    assert writer.queued_bytes == 0
    assert metric(metrics, "retort_promptlog_written_total") == n
    assert metric(metrics, "retort_promptlog_queue_depth") == 0


async def test_batches_by_size_and_by_interval() -> None:
    sink = Sink()
    writer = BatchWriter(sink, batch_size=10, flush_interval_s=0.05)
    writer.start()
    for i in range(3):
        writer.submit(make_record(i))
    # Below batch_size: written when the interval passes.
    await until(lambda: len(sink.records) == 3)
    for i in range(3, 38):
        writer.submit(make_record(i))
    await writer.close()
    assert len(sink.records) == 38
    assert max(sink.batches) <= 10
    assert [r.request_id for r in sink.records] == [f"req-{i}" for i in range(38)]


async def test_steady_traffic_keeps_full_batches_while_a_write_is_slow() -> None:
    # Records arriving while a batch is being written wait for the interval (or a full
    # batch); they are not written at once in a stream of tiny batches.
    sink = Sink(delay_s=0.05)
    w = BatchWriter(sink, batch_size=1000, flush_interval_s=0.3)
    w.start()
    for i in range(120):  # one record every 5 ms for 0.6 s
        w.submit(make_record(i))
        await asyncio.sleep(0.005)
    await w.close()
    assert sum(sink.batches) == 120
    assert len(sink.batches) <= 4, sink.batches


async def test_submit_never_awaits_and_flush_waits(metrics: Metrics) -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    writer = BatchWriter(sink, batch_size=4, flush_interval_s=10, metrics=metrics)
    writer.start()
    for i in range(6):
        assert writer.submit(make_record(i))
    assert writer.pending("req-5")
    assert metric(metrics, "retort_promptlog_queue_depth") == 6
    flushing = asyncio.create_task(writer.flush())
    await until(lambda: sink.calls > 0)  # the writer is inside the store, which is stuck
    assert not flushing.done()  # so flush waits
    gate.set()
    await asyncio.wait_for(flushing, 5)
    assert len(sink.records) == 6
    assert not writer.pending("req-5")
    await writer.close()


async def test_queue_full_is_counted_and_bounded(metrics: Metrics) -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    size = make_record(0).approx_bytes()
    bound = size * 10 + size // 2
    writer = BatchWriter(sink, max_queue_bytes=bound, batch_size=4, metrics=metrics)
    writer.start()
    accepted = 0
    for i in range(50):
        accepted += writer.submit(make_record(i))
        assert writer.queued_bytes <= bound
        await asyncio.sleep(0)
    assert accepted == 10
    assert writer.dropped["queue_full"] == 40
    assert metric(metrics, "retort_promptlog_dropped_total", reason="queue_full") == 40
    gate.set()
    await writer.close()
    assert len(sink.records) == accepted
    assert writer.written + sum(writer.dropped.values()) == 50


async def test_transient_failures_are_retried() -> None:
    sink = Sink(fail_times=2)
    writer = BatchWriter(sink, retries=3, retry_backoff_s=0.01)
    writer.start()
    for i in range(5):
        writer.submit(make_record(i))
    await writer.close()
    assert len(sink.records) == 5
    assert not writer.dropped


async def test_database_down_holds_records_until_it_returns(metrics: Metrics) -> None:
    sink = Sink(fail_times=-1)  # down
    writer = BatchWriter(
        sink, retries=2, retry_backoff_s=0.01, retry_max_backoff_s=0.02, metrics=metrics
    )
    writer.start()
    for i in range(7):
        writer.submit(make_record(i))
    await waits.until(lambda: sink.calls >= 6)
    assert writer.degraded  # past `retries` failures
    assert metric(metrics, "retort_promptlog_degraded") == 1
    assert not writer.dropped
    assert writer.depth == 7
    sink.fail_times = 0  # back
    await asyncio.wait_for(writer.flush(), 5)
    assert [r.request_id for r in sink.records] == [f"req-{i}" for i in range(7)]
    assert not writer.degraded
    assert metric(metrics, "retort_promptlog_degraded") == 0
    await writer.close()
    assert not writer.dropped


async def test_database_down_at_shutdown_counts_what_is_left(metrics: Metrics) -> None:
    sink = Sink(fail_times=-1)
    writer = BatchWriter(sink, retry_backoff_s=0.01, metrics=metrics)
    writer.start()
    for i in range(5):
        writer.submit(make_record(i))
    await writer.close(timeout_s=0.2)
    assert writer.dropped == {"shutdown": 5}
    assert metric(metrics, "retort_promptlog_dropped_total", reason="shutdown") == 5


async def test_a_bad_record_drops_alone(metrics: Metrics) -> None:
    sink = Sink(poison="req-3")
    writer = BatchWriter(sink, metrics=metrics)
    writer.start()
    for i in range(6):
        writer.submit(make_record(i))
    await writer.close()
    assert sorted(r.request_id for r in sink.records) == [f"req-{i}" for i in (0, 1, 2, 4, 5)]
    assert writer.dropped == {"error": 1}
    assert metric(metrics, "retort_promptlog_dropped_total", reason="error") == 1


async def test_close_flushes_everything_from_a_slow_store() -> None:
    sink = Sink(delay_s=0.02)
    writer = BatchWriter(sink, batch_size=16, flush_interval_s=5)
    writer.start()
    for i in range(200):
        writer.submit(make_record(i))
    await writer.close()
    assert len(sink.records) == 200
    assert not writer.dropped


async def test_close_timeout_counts_what_is_left(metrics: Metrics) -> None:
    sink = Sink(gate=asyncio.Event())  # never opens
    writer = BatchWriter(sink, batch_size=4, metrics=metrics)
    writer.start()
    for i in range(10):
        writer.submit(make_record(i))
    await writer.close(timeout_s=0.1)
    assert writer.dropped["shutdown"] == 10
    assert not writer.submit(make_record(99))  # after close: counted, not queued
    assert writer.dropped["shutdown"] == 11
    assert metric(metrics, "retort_promptlog_dropped_total", reason="shutdown") == 11
    assert writer.queued_bytes == 0


async def test_prepare_runs_before_insert_and_its_failure_is_counted() -> None:
    sink = Sink()

    def upper(records: list[LogRecord]) -> list[LogRecord]:
        if any(r.request_id == "boom" for r in records):
            raise RuntimeError("prepare failed")
        return [make_record(0, request_id=r.request_id, completion=r.completion.upper())
                for r in records]  # fmt: skip

    writer = BatchWriter(sink, prepare=upper)
    writer.start()
    writer.submit(make_record(1, completion="quiet"))
    await writer.flush()
    writer.submit(make_record(2, request_id="boom"))
    await writer.close()
    assert [r.completion for r in sink.records] == ["QUIET"]
    assert writer.dropped == {"error": 1}


async def test_postgres_down_then_back(metrics: Metrics) -> None:
    """A real Postgres stops: records wait in the queue (nothing dropped); when it is back,
    they are written, in order."""
    with service(postgres_server()) as pg:
        async with PromptStore(pg.url) as store:
            writer = BatchWriter(
                store, retries=1, retry_backoff_s=0.05, retry_max_backoff_s=0.2, metrics=metrics
            )
            writer.start()
            writer.submit(make_record(0))
            await writer.flush()
            assert writer.written == 1
            pg.stop()
            for i in range(1, 6):
                writer.submit(make_record(i))
            await waits.until(lambda: bool(writer.degraded))
            assert writer.depth == 5
            pg.start()
            for i in range(6, 9):
                writer.submit(make_record(i))
            await writer.close()
            assert writer.written == 9
            assert not writer.dropped
            assert [r["request_id"] for r in await store.query()] == [f"req-{i}" for i in range(9)]


async def test_queue_memory_stays_within_the_bound() -> None:
    from gateway.promptlog.bench import queue_memory

    for text_chars in (0, 3000):
        got = await queue_memory(bound_bytes=4 * 1024 * 1024, text_chars=text_chars)
        assert got.accepted > 0
        assert got.estimated_bytes <= got.bound_bytes
        # The estimate tracks the real memory of the queued records.
        assert got.traced_bytes <= got.bound_bytes * 1.1
        assert got.traced_bytes >= got.bound_bytes * 0.8


async def test_a_locked_sqlite_file_delays_records_and_drops_none(tmp_path: Path) -> None:
    """Another process holds the SQLite file locked: inserts wait (``busy_timeout``), the
    request path does not, and everything is written once the lock goes."""
    import sqlite3

    db = tmp_path / "retort.db"
    async with PromptStore(f"sqlite+aiosqlite:///{db}") as store:
        writer = BatchWriter(store, flush_interval_s=0.05)
        writer.start()
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            for i in range(50):
                assert writer.submit(make_record(i))  # never waits on the lock
            await asyncio.sleep(0.5)
            assert writer.written == 0
            assert writer.depth == 50
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await asyncio.wait_for(writer.flush(), 10)
        await writer.close()
        assert await store.count() == 50
    assert not writer.dropped
