"""``PromptLog``: store, writer, capture policy, redaction and retention, put together.

Built once in the lifespan: ``PromptLog.start(settings.promptlog, settings.home_path,
metrics)`` accepts records at once, then ``await log.connect()`` (retried while the database
is unreachable) opens the store; ``await PromptLog.open(...)`` does both. Closed after the
requests in flight have drained (``await log.close()``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from gateway.errors import ServiceUnavailableError
from gateway.promptlog.policy import CapturePolicy, run_retention
from gateway.promptlog.redact import Redactor
from gateway.promptlog.responses import ResponseStore
from gateway.promptlog.settings import PromptLogSettings
from gateway.promptlog.spool import Spool
from gateway.promptlog.writer import BatchWriter
from retort.db.store import PromptStore
from retort.settings import default_url, spool_dir

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from gateway.metrics import Metrics
    from retort.db.record import LogRecord

__all__ = ["PromptLog", "PromptLogUnavailableError"]

log = logging.getLogger("retort.promptlog")

FEEDBACK_FLUSH_S = 5.0
"""How long feedback waits for its request's record to be written."""


class PromptLogUnavailableError(ServiceUnavailableError):
    """503: the prompt-log database cannot be reached (feedback cannot be stored now)."""

    code = "promptlog_unavailable"

    def __init__(self) -> None:
        super().__init__("The prompt-log database is unreachable; retry later.")
        self.headers: dict[str, str] = {"Retry-After": "5"}


class PromptLog:
    """The gateway's prompt log. With ``enabled: false`` nothing is opened or recorded
    (and feedback finds no request)."""

    def __init__(
        self,
        settings: PromptLogSettings,
        *,
        store: PromptStore | None = None,
        writer: BatchWriter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = writer
        self.responses = ResponseStore(store) if store is not None else None
        """Stored responses (``/v1/responses`` with ``store``), redacted like the log."""
        self.policy = CapturePolicy.from_settings(settings)
        self.redactor: Redactor | None = None
        """The log's redaction, for what is stored beside it (shadow pairs)."""
        self._retention: asyncio.Task[None] | None = None
        self._sink: _OpeningStore | None = None

    @classmethod
    async def open(
        cls,
        settings: PromptLogSettings | None,
        home: Path,
        metrics: Metrics | None = None,
    ) -> PromptLog:
        """Start the log and open its store (migrating it); raises when the database cannot
        be reached (:meth:`start` then :meth:`connect` accept records before that)."""
        self = cls.start(settings, home, metrics)
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    @classmethod
    def start(
        cls,
        settings: PromptLogSettings | None,
        home: Path,
        metrics: Metrics | None = None,
    ) -> PromptLog:
        """Start the writer at once, before the database has answered: records submitted
        meanwhile wait in the bounded queue (or the disk spool) exactly as in an outage after
        start, and reach the database once it answers. :meth:`connect` opens the store for
        everything else (feedback, stored responses, the console, shadow pairs). Call in the
        running event loop."""
        settings = settings or PromptLogSettings()
        if not settings.enabled:
            return cls(settings)
        redactor = Redactor(settings.redact_patterns) if settings.redact else None
        sink = _OpeningStore(PromptStore(settings.url or default_url(home)))

        def prepare(records: list[LogRecord]) -> list[LogRecord]:
            assert redactor is not None
            return [redactor.redact_record(r) for r in records]

        writer = BatchWriter(
            sink,
            max_queue_bytes=settings.queue_max_bytes,
            batch_size=settings.batch_size,
            flush_interval_s=settings.flush_interval_s,
            retries=settings.retries,
            retry_backoff_s=settings.retry_backoff_s,
            retry_max_backoff_s=settings.retry_max_backoff_s,
            close_timeout_s=settings.close_timeout_s,
            metrics=metrics,
            prepare=prepare if redactor is not None else None,
            spool=(
                Spool(spool_dir(settings.spool_dir, home), settings.spool_max_bytes)
                if settings.spool == "disk"
                else None
            ),
        )
        writer.start()
        self = cls(settings, writer=writer)
        self.redactor = redactor
        self._sink = sink
        sink.on_open = self._opened
        return self

    async def connect(self) -> None:
        """Open the store (once; raises while the database is unreachable, so call again),
        then serve what needs it and start the retention purge. The writer's first
        successful write opens it too."""
        if self.store is None and self._sink is not None:
            await self._sink.ensure_open()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Whether the store is open within ``timeout_s`` (opened by :meth:`connect` or by
        the writer, whichever reaches the database first)."""
        if self._sink is None:
            return self.store is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sink.opened.wait(), timeout_s)
        return self.store is not None

    def _opened(self, store: PromptStore) -> None:
        self.responses = ResponseStore(store)
        self.responses.redactor = self.redactor
        self.store = store
        if self.settings.retention_days:
            self._retention = asyncio.create_task(
                run_retention(
                    store, self.settings.retention_days, interval_s=self.settings.purge_interval_s
                ),
                name="promptlog-retention",
            )

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def should_capture(
        self, request_id: str, key_id: str | None = None, header: str | None = None
    ) -> bool:
        """Whether to build a record for this request (``header``: ``x-retort-log``)."""
        return self.writer is not None and self.policy.should_capture(request_id, key_id, header)

    def submit(self, record: LogRecord) -> bool:
        """Queue a record (O(1), never awaits); redaction happens off the request path."""
        if self.writer is None:
            return False
        return self.writer.submit(record)

    async def add_feedback(
        self,
        request_id: str,
        score: float,
        comment: str | None = None,
        correction: str | None = None,
    ) -> bool:
        """Store feedback (``correction``: a corrected answer); ``False`` (404) when no
        request has that id. A request whose record is still queued is flushed first (for
        at most ``FEEDBACK_FLUSH_S``: the database may be down), so feedback right after a
        response works. ``/v1/feedback`` and the console use this."""
        if self.store is None:
            if self.writer is not None:
                raise PromptLogUnavailableError  # enabled, but the database has not answered
            return False
        if self.writer is not None and self.writer.pending(request_id):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FEEDBACK_FLUSH_S):
                    await self.writer.flush()
        try:
            return await self.store.add_feedback(request_id, score, comment, correction)
        except (DBAPIError, OSError) as exc:
            if isinstance(exc, IntegrityError | DataError):
                raise
            raise PromptLogUnavailableError from exc

    async def close(self) -> None:
        """Flush the queue (bounded by ``close_timeout_s``), stop the purge, close the store."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        if self.writer is not None:
            await self.writer.close()
        if self._sink is not None:
            await self._sink.store.close()
        elif self.store is not None:
            await self.store.close()


class _OpeningStore:
    """The writer's sink: the store, opened (and migrated) by the first write that finds it
    closed. A write while the database is unreachable fails like any insert, so the
    writer's retries, degraded state and spool cover an outage at start as after it."""

    def __init__(self, store: PromptStore) -> None:
        self.store = store
        self.on_open: Callable[[PromptStore], None] | None = None
        self.opened = asyncio.Event()
        self._lock = asyncio.Lock()

    async def ensure_open(self) -> PromptStore:
        if not self.opened.is_set():
            async with self._lock:
                if not self.opened.is_set():
                    await self.store.open()
                    if self.on_open is not None:
                        self.on_open(self.store)
                    self.opened.set()
        return self.store

    async def insert_many(self, records: Sequence[LogRecord]) -> int:
        store = await self.ensure_open()
        return await store.insert_many(records)

    def is_data_error(self, error: BaseException) -> bool:
        return self.store.is_data_error(error)
