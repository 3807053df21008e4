"""The prompt log's gateway side: every request recorded (off the request path).

- :class:`PromptLog` — the assembled service the lifespan builds.
- :class:`BatchWriter` — bounded queue, batched inserts, retries, drop accounting.
- :class:`CapturePolicy`, :class:`Redactor` — what is recorded, and what is scrubbed.

The database itself (schema, migrations, :class:`retort.db.store.PromptStore`, the
:class:`retort.db.record.LogRecord` row, ``retort logs export``) lives in :mod:`retort.db`,
shared with ``distill``.
"""

from gateway.promptlog.policy import (
    LOG_HEADER,
    TAGS_HEADER,
    CapturePolicy,
    parse_tags,
    run_retention,
)
from gateway.promptlog.redact import Redactor
from gateway.promptlog.service import PromptLog
from gateway.promptlog.settings import PromptLogSettings
from gateway.promptlog.writer import BatchWriter

__all__ = [
    "LOG_HEADER",
    "TAGS_HEADER",
    "BatchWriter",
    "CapturePolicy",
    "PromptLog",
    "PromptLogSettings",
    "Redactor",
    "parse_tags",
    "run_retention",
]
