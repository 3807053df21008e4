"""The prompt log: every request recorded (off the request path) for ops and distillation.

- :class:`LogRecord` — one request; :class:`PromptLog` — the assembled service.
- :class:`PromptStore` — SQLAlchemy async store (SQLite/WAL or Postgres), Alembic-migrated.
- :class:`BatchWriter` — bounded queue, batched inserts, retries, drop accounting.
- :class:`CapturePolicy`, :class:`Redactor` — what is recorded, and what is scrubbed.
- :mod:`gateway.promptlog.export` — ``retort logs export`` (``logs_app``).
"""

from gateway.promptlog.migrate import upgrade
from gateway.promptlog.policy import (
    LOG_HEADER,
    TAGS_HEADER,
    CapturePolicy,
    parse_tags,
    run_retention,
)
from gateway.promptlog.record import LogRecord
from gateway.promptlog.redact import Redactor
from gateway.promptlog.service import PromptLog
from gateway.promptlog.settings import PromptLogSettings, default_url
from gateway.promptlog.store import PromptStore, StoreError
from gateway.promptlog.writer import BatchWriter

__all__ = [
    "LOG_HEADER",
    "TAGS_HEADER",
    "BatchWriter",
    "CapturePolicy",
    "LogRecord",
    "PromptLog",
    "PromptLogSettings",
    "PromptStore",
    "Redactor",
    "StoreError",
    "default_url",
    "parse_tags",
    "run_retention",
    "upgrade",
]
