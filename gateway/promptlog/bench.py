"""Prompt-log benchmarks (for ``make bench``): writer throughput and the queue's memory bound.

``python -m gateway.promptlog.bench [URL ...]`` prints both (SQLite in a temp folder when no
URL is given).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import tracemalloc
import uuid
from typing import TYPE_CHECKING

import msgspec

from gateway.promptlog.writer import BatchWriter, MiB
from retort.db.record import LogRecord
from retort.db.store import PromptStore

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["QueueMemory", "WriterThroughput", "queue_memory", "sample_record", "writer_throughput"]


def sample_record(i: int, text_chars: int = 1000) -> LogRecord:
    """A chat record with about ``text_chars`` characters of prompt and completion."""
    half = "lorem ipsum " * max(1, text_chars // 24)
    return LogRecord(
        request_id=uuid.uuid4().hex,
        created=time.time(),
        model="bench-model",
        endpoint="chat",
        adapter="bench-adapter" if i % 2 else None,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"{half} #{i}"},
        ],
        params={"temperature": 0.7, "top_p": 1.0, "max_tokens": 128, "stop": None, "seed": None},
        completion=f"{half} #{i}",
        finish_reason="stop",
        prompt_tokens=300,
        completion_tokens=120,
        ttft_s=0.02,
        latency_s=0.8,
        cost_usd=3.1e-5,
        tags={"app": "bench"},
        user="bench-user",
    )


class WriterThroughput(msgspec.Struct, kw_only=True):
    dialect: str
    redact: bool
    records: int
    seconds: float
    records_per_s: float
    submit_us: float
    """Mean cost of one ``submit`` call (the request path's share), in microseconds."""
    dropped: int


async def writer_throughput(
    url: str,
    *,
    records: int = 20_000,
    text_chars: int = 1000,
    batch_size: int = 256,
    redact: bool = True,
) -> WriterThroughput:
    """Submit ``records`` as fast as the loop allows, then close: records written per second
    from the first submit until the last record is in the database (redacted on the way,
    as the gateway does by default)."""
    from gateway.promptlog.redact import Redactor

    batch = [sample_record(i, text_chars) for i in range(records)]
    redactor = Redactor()

    def prepare(recs: list[LogRecord]) -> list[LogRecord]:
        return [redactor.redact_record(r) for r in recs]

    async with PromptStore(url) as store:
        writer = BatchWriter(store, batch_size=batch_size, prepare=prepare if redact else None)
        writer.start()
        submit_s = 0.0
        start = time.perf_counter()
        for lo in range(0, records, 500):
            t = time.perf_counter()
            for rec in batch[lo : lo + 500]:
                writer.submit(rec)
            submit_s += time.perf_counter() - t
            await asyncio.sleep(0)  # requests interleave with the writer
        await writer.close(timeout_s=600)
        seconds = time.perf_counter() - start
        return WriterThroughput(
            dialect=store.dialect,
            redact=redact,
            records=writer.written,
            seconds=seconds,
            records_per_s=writer.written / seconds,
            submit_us=submit_s / records * 1e6,
            dropped=sum(writer.dropped.values()),
        )


class QueueMemory(msgspec.Struct, kw_only=True):
    bound_bytes: int
    accepted: int
    estimated_bytes: int
    traced_bytes: int
    """Python memory allocated while filling the queue (tracemalloc)."""


class _Stuck:
    async def insert_many(self, records: Sequence[LogRecord]) -> int:
        await asyncio.Event().wait()
        return 0


async def queue_memory(bound_bytes: int = 64 * MiB, text_chars: int = 2000) -> QueueMemory:
    """Fill the queue of a writer whose database never answers, until it drops records."""
    tracemalloc.start()
    try:
        writer = BatchWriter(
            _Stuck(), max_queue_bytes=bound_bytes, batch_size=1 << 30, flush_interval_s=3600
        )
        writer.start()
        base = tracemalloc.get_traced_memory()[0]
        accepted = 0
        while writer.submit(sample_record(accepted, text_chars)):
            accepted += 1
        traced = tracemalloc.get_traced_memory()[0] - base
        estimated = writer.queued_bytes
    finally:
        tracemalloc.stop()
    await writer.close(timeout_s=0)
    return QueueMemory(
        bound_bytes=bound_bytes,
        accepted=accepted,
        estimated_bytes=estimated,
        traced_bytes=traced,
    )


async def _main(urls: list[str]) -> None:
    import logging

    logging.disable(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        for url in urls or [f"sqlite+aiosqlite:///{tmp}/bench.db"]:
            for redact in (False, True):
                result = await writer_throughput(url, redact=redact)
                print(msgspec.json.encode(result).decode())
    print(msgspec.json.encode(await queue_memory()).decode())


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
