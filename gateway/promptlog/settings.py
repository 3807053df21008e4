"""The prompt log's settings section (``promptlog:``)."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["PromptLogSettings"]


class PromptLogSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    """Record requests at all."""
    url: str | None = None
    """SQLAlchemy URL: ``postgresql+asyncpg://user:pw@host/db`` or ``sqlite+aiosqlite:///path``;
    ``sqlite+aiosqlite:///$RETORT_HOME/retort.db`` when unset."""
    queue_max_bytes: int = 64 * 1024 * 1024
    """Bound on the memory of records waiting to be written; past it records are dropped
    (counted in ``retort_promptlog_dropped_total{reason="queue_full"}``)."""
    batch_size: int = 256
    """Records per insert."""
    flush_interval_s: float = 0.5
    """A partial batch is written after at most this long."""
    retries: int = 3
    """Failed tries of an insert after which the database counts as down
    (``retort_promptlog_degraded`` 1; with ``spool: disk`` batches then go to the spool).
    Records are never dropped for a database error: they wait, within ``queue_max_bytes``."""
    retry_backoff_s: float = 0.2
    """First retry delay; doubles each retry, up to ``retry_max_backoff_s``."""
    retry_max_backoff_s: float = 2.0
    """Longest wait between tries while the database is down: its return is noticed
    within this long."""
    spool: Literal["none", "disk"] = "none"
    """``disk``: while the database is down, records go to an append-only spool file
    (redacted, one JSON line each) instead of waiting in memory; on recovery, and on the
    next start after a crash, the spool is replayed into the database, each record once."""
    spool_dir: str = ""
    """The spool's folder; ``$RETORT_HOME/promptlog-spool`` when empty. Give each replica
    its own (the state volume is per pod)."""
    spool_max_bytes: int = 1024 * 1024 * 1024
    """Bound on the spool's size; past it records are dropped (``reason="spool_full"``)."""
    close_timeout_s: float = 10.0
    """On shutdown, how long flushing the queue may take; what is left is counted dropped."""
    sample_rate: float = 1.0
    """Fraction of requests recorded, decided by a hash of the request id (deterministic)."""
    redact: bool = True
    """Redact emails, phone and card numbers and API-key-like strings before storage."""
    redact_patterns: list[str] = msgspec.field(default_factory=list)
    """More regexes to redact (replaced by ``[REDACTED:CUSTOM]``)."""
    retention_days: float | None = None
    """Delete records (and their feedback) older than this; kept forever when unset."""
    purge_interval_s: float = 3600.0
    """How often the retention purge runs."""
    disabled_keys: list[str] = msgspec.field(default_factory=list)
    """API key ids whose requests are never recorded."""
