"""The batch writer: the request path hands records over in O(1); a task writes them.

``submit`` never awaits: it appends to an in-memory queue bounded by the records'
approximate bytes (:meth:`LogRecord.approx_bytes`), or counts the record dropped
(``queue_full``) when the bound would be passed. One background task drains the queue:
everything queued is written when ``batch_size`` records are waiting or every
``flush_interval_s``, in transactions of at most ``batch_size`` records (under load the
batches grow by themselves).

A database error never drops a record. A failed insert is tried again with exponential
backoff (``retry_backoff_s`` doubling up to ``retry_max_backoff_s``); after ``retries``
failures the database counts as down (``retort_promptlog_degraded`` 1). Its batch and
everything behind it then wait in the bounded queue (the bound still applies: past it,
``queue_full``), or, with a :class:`~gateway.promptlog.spool.Spool`, go to the disk spool,
which is replayed into the database once it answers again (and at the next start after a
crash). When a failure is about the rows themselves, the batch's records are tried one
by one so that only the bad ones drop (``error``). ``close`` writes everything left;
what cannot be written (or spooled) in ``close_timeout_s`` is counted dropped
(``shutdown``). Nothing leaves the queue uncounted.

Call ``submit`` from the event loop's thread (it is not thread-safe).

Past ~400 lines on purpose: the queue, the batching, the retry and degraded state and the
spool's write and replay are one state machine over one queue; the spool's file format is
its own module (:mod:`gateway.promptlog.spool`).
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
    from gateway.promptlog.spool import Spool
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
        retry_max_backoff_s: float = 2.0,
        close_timeout_s: float = 10.0,
        metrics: Metrics | None = None,
        prepare: Callable[[list[LogRecord]], list[LogRecord]] | None = None,
        spool: Spool | None = None,
    ) -> None:
        if max_queue_bytes <= 0 or batch_size <= 0 or flush_interval_s <= 0 or retries < 0:
            raise ValueError("max_queue_bytes, batch_size and flush_interval_s must be positive")
        self.store = store
        self.max_queue_bytes = max_queue_bytes
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.retry_max_backoff_s = max(retry_max_backoff_s, retry_backoff_s)
        self.close_timeout_s = close_timeout_s
        self.metrics = metrics
        self.prepare = prepare
        self.spool = spool
        self._down = False
        self._backlog = spool is not None
        """The spool may hold records to replay (a previous process's, at first)."""
        self._next_probe = 0.0
        self._probe_delay = retry_backoff_s
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
        self.spooled = 0
        """Records written to the disk spool so far."""

    # -- state ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records queued or being written."""
        return len(self._queue) + len(self._inflight)

    @property
    def degraded(self) -> bool:
        """Whether the database counts as down (records wait, or go to the spool)."""
        return self._down

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
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)

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
        if len(self._queue) >= self.batch_size or self._spooling:
            # While spooling, each record goes to disk at once: a crash loses next to none.
            assert self._wake is not None
            self._wake.set()
        return True

    @property
    def _spooling(self) -> bool:
        return self._down and self.spool is not None

    # -- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        if self._backlog:  # what a previous process left in the spool
            await self._replay()
        while True:
            if self._backlog and not self._closing and time.monotonic() >= self._next_probe:
                await self._replay()
            if not self._queue and self._closing:
                return
            if (
                len(self._queue) < self.batch_size
                and not self._closing
                and not self._flush_requested
                and not (self._spooling and self._queue)
            ):
                timeout = self.flush_interval_s
                if self._backlog:  # wake up for the next replay attempt
                    timeout = min(timeout, max(0.0, self._next_probe - time.monotonic()))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
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
                if len(self._queue) < self.batch_size and not (
                    flushing or self._closing or self._spooling
                ):
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
        written = await self._store(records)
        if written:
            self.written += written
            if self.metrics is not None:
                self.metrics.promptlog_written(written)
        self._finish(batch)

    async def _store(self, records: list[LogRecord]) -> int:
        """Insert (or, while the database is down, spool) a batch; returns how many rows
        were written. Tries until it succeeds: a database error never drops a record."""
        delay = self.retry_backoff_s
        failures = 0
        spool_refused = False
        while True:
            if self._spooling and not spool_refused:
                if await self._to_spool(records):
                    return 0
                spool_refused = True  # the disk refuses: wait in memory, as without a spool
            try:
                await self.store.insert_many(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._is_data_error(exc):
                    return await self._insert_one_by_one(records)
                failures += 1
                if failures > self.retries:
                    self._set_down(True, exc)
                self._log_rate_limited(
                    "retry",
                    "prompt log: insert of %d records failed (%s); trying again in %.1fs",
                    len(records), exc, delay,
                )  # fmt: skip
                if self._spooling and not spool_refused:
                    continue  # to the spool at once
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_backoff_s)
                spool_refused = False
                continue
            if self._down and not self._backlog:
                self._set_down(False)
            return len(records)

    # -- the spool ------------------------------------------------------------------------

    async def _to_spool(self, records: list[LogRecord]) -> bool:
        """Append to the spool; ``False`` when the disk refuses (the batch then waits in
        memory, as without a spool). Past ``spool_max_bytes`` the records are dropped."""
        from gateway.promptlog.spool import SpoolFullError

        assert self.spool is not None
        try:
            size = await asyncio.to_thread(self.spool.append, records)
        except SpoolFullError as exc:
            self._log_rate_limited("spool_full", "prompt log: %s; dropping records", exc)
            self._count_dropped("spool_full", len(records))
            return True
        except OSError as exc:
            self._log_rate_limited("spool", "prompt log: cannot write the spool: %s", exc)
            return False
        self._backlog = True
        self.spooled += len(records)
        if self.metrics is not None:
            self.metrics.promptlog_spooled(len(records))
            self.metrics.promptlog_spool_bytes.inc(size)
        return True

    async def _replay(self) -> bool:
        """Write the spool's backlog into the database, oldest file first (idempotent: a
        record already there is skipped). ``False`` when the database is still down (or the
        spool cannot be read): tried again later."""
        try:
            return await self._replay_backlog()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prompt log: replaying the spool failed; trying again later")
            self._next_probe = time.monotonic() + self.retry_max_backoff_s
            return False

    async def _replay_backlog(self) -> bool:
        from gateway.promptlog.spool import replay

        assert self.spool is not None
        if not await replay(self.spool, self._insert_replayed, self.batch_size):
            self._next_probe = time.monotonic() + self._probe_delay
            self._probe_delay = min(self._probe_delay * 2, self.retry_max_backoff_s)
            await self._refresh_spool_bytes()
            return False
        self._backlog = False
        self._probe_delay = self.retry_backoff_s
        self._set_down(False)
        await self._refresh_spool_bytes()
        return True

    async def _insert_replayed(self, chunk: list[LogRecord], corrupt: int) -> bool:
        """Write a chunk of the spool (and count its file's unreadable lines); ``False``
        when the database is down."""
        if corrupt:
            self._count_dropped("error", corrupt)
        if not chunk:
            return True
        try:
            await self.store.insert_many(chunk)
            written = len(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._is_data_error(exc):
                self._set_down(True, exc)
                return False
            written = await self._insert_one_by_one(chunk)
        self.written += written
        if self.metrics is not None:
            self.metrics.promptlog_written(written)
        return True

    async def _refresh_spool_bytes(self) -> None:
        if self.metrics is not None and self.spool is not None:
            self.metrics.set_promptlog_spool_bytes(await asyncio.to_thread(self.spool.size))

    def _set_down(self, down: bool, exc: BaseException | None = None) -> None:
        if down == self._down:
            return
        self._down = down
        if down:
            where = "the disk spool" if self.spool is not None else "the queue"
            log.warning("prompt log: the database is down (%s); records wait in %s", exc, where)
            self._next_probe = time.monotonic() + self._probe_delay
        else:
            log.warning("prompt log: the database is back")
        if self.metrics is not None:
            self.metrics.set_promptlog_degraded(down)

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
