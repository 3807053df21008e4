"""PromptLog: the assembled service, as the lifespan and routes use it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.promptlog import PromptLog, PromptLogSettings
from tests.unit.gateway.promptlog.conftest import make_record
from tests.unit.gateway.promptlog.docs import undocumented_fields

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_default_store_is_sqlite_in_home_and_redacts(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    plog = await PromptLog.open(PromptLogSettings(flush_interval_s=30), tmp_path, metrics)
    try:
        assert (tmp_path / "retort.db").exists()
        assert plog.should_capture("r1")
        assert not plog.should_capture("r1", header="off")
        assert plog.submit(make_record(1, completion="mail me: a@b.io"))
        # Feedback right after the response: the record is still queued, so it is flushed.
        assert await plog.add_feedback("req-1", 1.0, "nice")
        assert not await plog.add_feedback("req-unknown", 1.0)
        assert plog.store is not None
        rows = await plog.store.query()
        assert rows[0]["completion"] == "mail me: [REDACTED:EMAIL]"
        assert rows[0]["score"] == 1.0
        assert metrics.registry.get_sample_value("retort_promptlog_written_total") == 1
    finally:
        await plog.close()


async def test_close_flushes_the_queue(tmp_path: Path) -> None:
    settings = PromptLogSettings(url=f"sqlite+aiosqlite:///{tmp_path}/x.db", flush_interval_s=30,
                                 redact=False)  # fmt: skip
    plog = await PromptLog.open(settings, tmp_path)
    for i in range(300):
        plog.submit(make_record(i))
    store = plog.store
    await plog.close()
    assert store is not None
    async with store:
        assert await store.count() == 300


async def test_disabled_opens_nothing(tmp_path: Path) -> None:
    plog = await PromptLog.open(PromptLogSettings(enabled=False), tmp_path)
    assert not plog.enabled
    assert not plog.should_capture("r1")
    assert not plog.submit(make_record(1))
    assert not await plog.add_feedback("req-1", 1.0)
    await plog.close()
    assert not (tmp_path / "retort.db").exists()


async def test_retention_task_runs_and_stops(tmp_path: Path) -> None:
    import time

    settings = PromptLogSettings(retention_days=1, purge_interval_s=0.05)
    plog = await PromptLog.open(settings, tmp_path)
    assert plog.store is not None
    await plog.store.insert_many([make_record(0, created=time.time() - 3 * 86400), make_record(1)])
    for _ in range(100):
        if await plog.store.count() == 1:
            break
        await asyncio.sleep(0.02)
    assert [r["request_id"] for r in await plog.store.query()] == ["req-1"]
    await plog.close()


async def test_settings_are_strict_and_documented() -> None:
    assert undocumented_fields(PromptLogSettings) == []
    s = msgspec.convert({"sample_rate": 0.5, "disabled_keys": ["a"]}, PromptLogSettings)
    assert s.sample_rate == 0.5
    assert s.queue_max_bytes == 64 * 1024 * 1024
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"sampel_rate": 0.5}, PromptLogSettings)


async def test_feedback_while_the_database_is_down_is_a_503() -> None:
    from gateway.promptlog.service import PromptLogUnavailableError
    from loadtest.servers import free_port
    from retort.db.store import PromptStore

    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"  # nothing listens
    store = await PromptStore(url).open(migrate=False)
    try:
        plog = PromptLog(PromptLogSettings(), store=store)
        with pytest.raises(PromptLogUnavailableError) as err:
            await plog.add_feedback("req-1", 1.0)
        assert err.value.status_code == 503
        assert err.value.headers["Retry-After"] == "5"
    finally:
        await store.close()


async def test_records_accepted_before_the_database_first_answers_reach_it(tmp_path: Path) -> None:
    """An outage at start is an outage like any other: the log accepts records from the
    first request, holds them in its queue (degraded), and writes them once it can."""
    from gateway.promptlog.service import PromptLogUnavailableError

    blocker = tmp_path / "data"
    blocker.write_text("a file where the database's directory must go")
    url = f"sqlite+aiosqlite:///{blocker}/log.db"  # unreachable: its directory cannot exist
    metrics = Metrics(CollectorRegistry())
    settings = PromptLogSettings(url=url, flush_interval_s=0.05, retries=1, retry_backoff_s=0.05,
                                 retry_max_backoff_s=0.1, redact=False)  # fmt: skip
    with pytest.raises(OSError):
        await PromptLog.open(settings, tmp_path)  # raises; ``start`` does not
    plog = PromptLog.start(settings, tmp_path, metrics)
    try:
        with pytest.raises(OSError):
            await plog.connect()
        assert plog.store is None
        for i in range(5):
            assert plog.should_capture(f"req-{i}")
            assert plog.submit(make_record(i))
        for _ in range(100):
            if metrics.registry.get_sample_value("retort_promptlog_degraded") == 1:
                break
            await asyncio.sleep(0.02)
        assert metrics.registry.get_sample_value("retort_promptlog_degraded") == 1
        with pytest.raises(PromptLogUnavailableError):
            await plog.add_feedback("req-1", 1.0)  # 503 until the store is open, not 404
        assert plog.writer is not None
        assert plog.writer.depth == 5

        blocker.unlink()  # the database becomes reachable: the writer's next try opens it
        assert await plog.wait_connected(10)
        assert plog.store is not None
        await asyncio.wait_for(plog.writer.flush(), 10)
        assert await plog.store.count() == 5
        assert await plog.add_feedback("req-1", 1.0)
        assert metrics.registry.get_sample_value("retort_promptlog_degraded") == 0
        assert not plog.writer.dropped
    finally:
        await plog.close()
