"""The batch writer: the request path hands records over in O(1); a task writes them.

``submit`` never awaits: it appends to an in-memory queue bounded by the records'
approximate bytes (:meth:`LogRecord.approx_bytes`), or counts the record dropped
(``queue_full``) when the bound would be passed. One background task drains the queue:
everything queued is written when ``batch_size`` records are waiting or every
``flush_interval_s``, in transactions of at most ``batch_size`` records (under load the
batches grow by themselves). A failed insert is retried with exponential backoff; a
batch that still fails is counted dropped (``db_error``), and when the failure is about
the rows themselves its records are tried one by one so that only the bad ones drop.
``close`` writes everything left; what cannot be written in ``close_timeout_s`` is counted
dropped (``shutdown``). Nothing leaves the queue uncounted.

Call ``submit`` from the event loop's thread (it is not thread-safe).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from gateway.metrics import Metrics
    from retort.db.record import LogRecord

__all__ = ["BatchWriter", "RecordSink"]

log = logging.getLogger("retort.promptlog")

MiB = 1024 * 1024
_LOG_EVERY_S = 10.0


class RecordSink(Protocol):
    """Where batches go (:class:`~retort.db.store.PromptStore`)."""

    async def insert_many(self, records: Sequence[LogRecord]) -> int: ...


class BatchWriter:
    """Bounded, batched, never-blocking writes of :class:`LogRecord` s to a store.

    ``prepare`` (e.g. redaction) runs on each batch in a worker thread before insertion.
    """

    def __init__(
        self,
        store: RecordSink,
        *,
        max_queue_bytes: int = 64 * MiB,
        batch_size: int = 256,
        flush_interval_s: float = 0.5,
        retries: int = 3,
        retry_backoff_s: float = 0.2,
        close_timeout_s: float = 10.0,
        metrics: Metrics | None = None,
        prepare: Callable[[list[LogRecord]], list[LogRecord]] | None = None,
    ) -> None:
        if max_queue_bytes <= 0 or batch_size <= 0 or flush_interval_s <= 0 or retries < 0:
            raise ValueError("max_queue_bytes, batch_size and flush_interval_s must be positive")
        self.store = store
        self.max_queue_bytes = max_queue_bytes
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.close_timeout_s = close_timeout_s
        self.metrics = metrics
        self.prepare = prepare
        is_data_error = getattr(store, "is_data_error", None)
        self._is_data_error: Callable[[BaseException], bool] = (
            is_data_error if callable(is_data_error) else lambda _e: False
        )
        self._queue: collections.deque[tuple[LogRecord, int]] = collections.deque()
        self._bytes = 0
        """Bytes of the records queued or being written (the bounded quantity)."""
        self._inflight: list[tuple[LogRecord, int]] = []
        self._pending: dict[str, int] = {}
        self._submitted = 0
        self._done = 0
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._flush_requested = False
        self._closing = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._last_log: dict[str, float] = {}
        self.written = 0
        """Records written so far."""
        self.dropped: collections.Counter[str] = collections.Counter()
        """Records dropped so far, by reason."""

    # -- state ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records queued or being written."""
        return len(self._queue) + len(self._inflight)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def pending(self, request_id: str) -> bool:
        """Whether a record with this request id is queued or being written."""
        return request_id in self._pending

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background task (in the running event loop)."""
        if self._task is not None:
            return
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="promptlog-writer")

    async def __aenter__(self) -> BatchWriter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self) -> None:
        """Wait until every record submitted before this call is written (or dropped)."""
        if self._task is None:
            return
        target = self._submitted
        while self._done < target and not self._task.done():
            self._flush_requested = True
            assert self._wake is not None
            assert self._progress is not None
            progress = self._progress
            self._wake.set()
            await progress.wait()

    async def close(self, timeout_s: float | None = None) -> None:
        """Write everything queued, then stop. Records not written within the timeout
        (``close_timeout_s`` by default) are counted dropped with reason ``shutdown``."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        task = self._task
        if task is None:
            self._drop_all_left("shutdown")
            return
        assert self._wake is not None
        self._wake.set()
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_all_left("shutdown")

    # -- the request path ----------------------------------------------------------------

    def submit(self, record: LogRecord) -> bool:
        """Queue a record (O(1), never awaits). ``False`` when it was dropped (and counted)."""
        if self._closed:
            self._count_dropped("shutdown", 1)
            return False
        size = record.approx_bytes()
        if self._bytes + size > self.max_queue_bytes:
            self._count_dropped("queue_full", 1)
            return False
        if self._task is None:
            self.start()
        self._queue.append((record, size))
        self._bytes += size
        self._submitted += 1
        rid = record.request_id
        self._pending[rid] = self._pending.get(rid, 0) + 1
        if self.metrics is not None:
            self.metrics.set_promptlog_queue_depth(len(self._queue) + len(self._inflight))
        if len(self._queue) >= self.batch_size:
            assert self._wake is not None
            self._wake.set()
        return True

    # -- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue and self._closing:
                return
            if (
                len(self._queue) < self.batch_size
                and not self._closing
                and not self._flush_requested
            ):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._wake.wait()
            flushing, self._flush_requested = self._flush_requested, False
            while self._queue:
                n = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the writer die
                    log.exception("prompt log: unexpected writer error")
                    self._count_dropped("error", len(batch))
                    self._finish(batch)
                # What arrived during the write waits for a full batch or the interval:
                # writing it at once would degrade, under steady load, into a stream of
                # tiny batches that keeps the writer (and the request path's CPU) busy.
                flushing = flushing or self._flush_requested
                if len(self._queue) < self.batch_size and not (flushing or self._closing):
                    break
            self._signal_progress()

    def _signal_progress(self) -> None:
        assert self._progress is not None
        self._progress.set()
        self._progress = asyncio.Event()

    def _finish(self, batch: list[tuple[LogRecord, int]]) -> None:
        """Release a batch's bytes and ids (written or dropped, it is accounted)."""
        if not self._inflight:
            return
        for record, size in batch:
            self._bytes -= size
            rid = record.request_id
            left = self._pending.get(rid, 0) - 1
            if left > 0:
                self._pending[rid] = left
            else:
                self._pending.pop(rid, None)
        self._done += len(batch)
        self._inflight = []
        if self.metrics is not None:
            self.metrics.set_promptlog_queue_depth(len(self._queue))
        self._signal_progress()

    async def _write(self, batch: list[tuple[LogRecord, int]]) -> None:
        self._inflight = batch
        records = [r for r, _ in batch]
        if self.prepare is not None:
            try:
                records = await asyncio.to_thread(self.prepare, records)
            except Exception:
                log.exception("prompt log: preparing %d records failed", len(records))
                self._count_dropped("error", len(batch))
                self._finish(batch)
                return
        written = await self._insert(records)
        if written:
            self.written += written
            if self.metrics is not None:
                self.metrics.promptlog_written(written)
        self._finish(batch)

    async def _insert(self, records: list[LogRecord]) -> int:
        """Insert with retries; returns how many were written, counting the rest dropped."""
        delay = self.retry_backoff_s
        error: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                await self.store.insert_many(records)
                return len(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                if self._is_data_error(exc):
                    break
                if attempt < self.retries:
                    self._log_rate_limited(
                        "retry",
                        "prompt log: insert of %d records failed (%s); retry %d/%d in %.1fs",
                        len(records), exc, attempt + 1, self.retries, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    delay *= 2
        assert error is not None
        if self._is_data_error(error) and len(records) > 1:
            return await self._insert_one_by_one(records)
        log.error("prompt log: dropping %d records after %d retries: %s",
                  len(records), self.retries, error)  # fmt: skip
        self._count_dropped("db_error", len(records))
        return 0

    async def _insert_one_by_one(self, records: list[LogRecord]) -> int:
        written = 0
        for record in records:
            try:
                await self.store.insert_many([record])
                written += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("prompt log: dropping record %s: %s", record.request_id, exc)
                self._count_dropped("error" if self._is_data_error(exc) else "db_error", 1)
        return written

    # -- accounting ---------------------------------------------------------------------

    def _count_dropped(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if self.metrics is not None:
            self.metrics.promptlog_dropped(reason, count)
        if reason == "queue_full":
            self._log_rate_limited(
                reason, "prompt log: queue full (%d bytes); dropping records", self._bytes
            )

    def _drop_all_left(self, reason: str) -> None:
        left = self._inflight + list(self._queue)
        self._queue.clear()
        if not left:
            return
        log.error("prompt log: %d records not written at shutdown", len(left))
        self._count_dropped(reason, len(left))
        self._inflight = left
        self._finish(left)

    def _log_rate_limited(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, 0.0) >= _LOG_EVERY_S:
            self._last_log[kind] = now
            log.warning(msg, *args)
