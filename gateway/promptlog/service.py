"""``PromptLog``: store, writer, capture policy, redaction and retention, put together.

Built once in the lifespan (``await PromptLog.open(settings.promptlog, settings.home_path,
metrics)``) and closed after the requests in flight have drained (``await log.close()``).
"""

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

    @classmethod
    async def open(
        cls,
        settings: PromptLogSettings | None,
        home: Path,
        metrics: Metrics | None = None,
    ) -> PromptLog:
        """Open the store (migrating it), start the writer and the retention purge."""
        settings = settings or PromptLogSettings()
        if not settings.enabled:
            return cls(settings)
        redactor = Redactor(settings.redact_patterns) if settings.redact else None
        store = await PromptStore(settings.url or default_url(home)).open()

        def prepare(records: list[LogRecord]) -> list[LogRecord]:
            assert redactor is not None
            return [redactor.redact_record(r) for r in records]

        writer = BatchWriter(
            store,
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
        self = cls(settings, store=store, writer=writer)
        self.redactor = redactor
        if self.responses is not None:
            self.responses.redactor = redactor
        if settings.retention_days:
            self._retention = asyncio.create_task(
                run_retention(store, settings.retention_days, interval_s=settings.purge_interval_s),
                name="promptlog-retention",
            )
        return self

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
        if self.store is not None:
            await self.store.close()
