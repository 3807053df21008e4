"""``promptlog.spool: disk``: records wait on disk while the database is down and are
replayed into it once, however often the replay runs."""

from __future__ import annotations

import asyncio
import fcntl
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.promptlog.spool import Spool
from gateway.promptlog.writer import BatchWriter
from retort.db.store import PromptStore
from tests import waits
from tests.unit.gateway.promptlog.conftest import Sink, make_record, metric

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def spool_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.jsonl")) if root.exists() else []


async def test_down_database_spools_then_replays_in_order(tmp_path: Path, metrics: Metrics) -> None:
    sink = Sink(fail_times=-1)
    spool = Spool(tmp_path / "spool", 1 << 20)
    writer = BatchWriter(
        sink,
        retries=1,
        retry_backoff_s=0.01,
        retry_max_backoff_s=0.05,
        flush_interval_s=0.05,
        metrics=metrics,
        spool=spool,
    )
    writer.start()
    for i in range(5):
        writer.submit(make_record(i))
    await waits.until(lambda: writer.spooled >= 5)
    assert writer.degraded
    assert writer.depth == 0  # on disk, not in memory
    for i in range(5, 10):  # while down, each record goes to the spool at once
        writer.submit(make_record(i))
    await asyncio.wait_for(writer.flush(), 5)
    assert writer.spooled == 10
    assert metric(metrics, "retort_promptlog_spooled_total") == 10
    assert metric(metrics, "retort_promptlog_spool_bytes") > 0
    assert sink.records == []
    sink.fail_times = 0  # the database is back: the next probe replays the spool
    await waits.until(lambda: not writer.degraded)
    await writer.close()
    assert [r.request_id for r in sink.records] == [f"req-{i}" for i in range(10)]
    assert spool_files(tmp_path / "spool") == []
    assert metric(metrics, "retort_promptlog_spool_bytes") == 0
    assert metric(metrics, "retort_promptlog_written_total") == 10
    assert not writer.dropped


async def test_shutdown_while_down_spools_everything_and_the_next_start_replays(
    tmp_path: Path,
) -> None:
    root = tmp_path / "spool"
    sink = Sink(fail_times=-1)
    writer = BatchWriter(sink, retries=0, retry_backoff_s=0.01, spool=Spool(root, 1 << 20))
    writer.start()
    for i in range(20):
        writer.submit(make_record(i))
    await writer.close(timeout_s=5)
    assert not writer.dropped
    assert writer.spooled == 20
    assert len(spool_files(root)) == 1
    async with PromptStore(f"sqlite+aiosqlite:///{tmp_path}/retort.db") as store:
        again = BatchWriter(store, spool=Spool(root, 1 << 20))
        again.start()
        await again.close()
        assert await store.count() == 20
    assert spool_files(root) == []


async def test_replay_is_idempotent_and_skips_a_cut_line(tmp_path: Path) -> None:
    """A process killed mid-replay (rows inserted, file not yet removed) or mid-append (a
    cut last line): the next replay writes each record once and counts the cut line."""
    root = tmp_path / "spool"
    records = [make_record(i) for i in range(6)]
    spool = Spool(root, 1 << 20)
    spool.append(records)
    spool.close()
    [path] = spool_files(root)
    with path.open("ab") as f:
        f.write(b'{"request_id": "cut-in-ha')
    async with PromptStore(f"sqlite+aiosqlite:///{tmp_path}/retort.db") as store:
        await store.insert_many(records[:4])  # replayed before the crash
        writer = BatchWriter(store, spool=Spool(root, 1 << 20))
        writer.start()
        await writer.close()
        rows = await store.query()
    assert sorted(r["request_id"] for r in rows) == [f"req-{i}" for i in range(6)]
    assert writer.dropped == {"error": 1}
    assert spool_files(root) == []


async def test_a_file_another_process_holds_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    other = Spool(root, 1 << 20)
    other.append([make_record(1)])  # still appending: its lock is held
    sink = Sink()
    writer = BatchWriter(sink, spool=Spool(root, 1 << 20))
    writer.start()
    await writer.close()
    assert sink.records == []
    [path] = spool_files(root)
    with path.open("rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.close()


async def test_a_full_spool_drops_and_counts(tmp_path: Path, metrics: Metrics) -> None:
    sink = Sink(fail_times=-1)
    size = len(make_record(0).request_id) + 400
    writer = BatchWriter(
        sink,
        retries=0,
        retry_backoff_s=0.01,
        metrics=metrics,
        spool=Spool(tmp_path / "spool", 2 * size),
        flush_interval_s=0.01,
    )
    writer.start()
    for i in range(6):
        writer.submit(make_record(i))
        await asyncio.wait_for(writer.flush(), 5)
    assert writer.dropped["spool_full"] >= 1
    assert writer.spooled + writer.dropped["spool_full"] == 6
    assert metric(metrics, "retort_promptlog_dropped_total", reason="spool_full") >= 1
    await writer.close(timeout_s=0.5)


async def test_an_unwritable_spool_falls_back_to_the_queue(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the spool folder cannot be created
    sink = Sink(fail_times=-1)
    writer = BatchWriter(
        sink, retries=0, retry_backoff_s=0.01, retry_max_backoff_s=0.02,
        spool=Spool(blocker / "spool", 1 << 20),
    )  # fmt: skip
    writer.start()
    for i in range(3):
        writer.submit(make_record(i))
    await waits.until(lambda: writer.degraded and sink.calls >= 4)
    assert writer.spooled == 0
    assert writer.depth == 3  # waiting in memory
    sink.fail_times = 0
    await asyncio.wait_for(writer.flush(), 5)
    await writer.close()
    assert [r.request_id for r in sink.records] == ["req-0", "req-1", "req-2"]
    assert not writer.dropped
