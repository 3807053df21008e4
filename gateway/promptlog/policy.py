"""Capture policy: which requests the prompt log records, and how long it keeps them."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gateway.promptlog.settings import PromptLogSettings
    from retort.db.store import PromptStore

__all__ = ["LOG_HEADER", "TAGS_HEADER", "CapturePolicy", "parse_tags", "run_retention", "sample"]

log = logging.getLogger("retort.promptlog")

LOG_HEADER = "x-retort-log"
"""Request header: ``off`` (or ``false``, ``0``, ``no``) keeps the request out of the log."""
TAGS_HEADER = "x-retort-tags"
"""Request header: ``key=value`` pairs separated by commas, stored as the record's tags."""
MAX_TAGS = 32
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
_OFF = frozenset({"off", "false", "0", "no", "none", "disabled"})
_SCALE = float(1 << 64)


def sample(request_id: str, rate: float) -> bool:
    """Deterministic sampling: the same request id always gets the same answer."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE < rate


def parse_tags(header: str | None = None, metadata: Any = None) -> dict[str, str]:
    """A record's tags: the request's ``metadata`` (string values) and then the
    ``x-retort-tags`` header (``team=search,env=prod``), which wins on conflicts. Bounded:
    at most 32 tags, keys cut to 64 characters and values to 256; malformed parts skipped."""
    tags: dict[str, str] = {}
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if isinstance(key, str) and key and isinstance(value, str | int | float | bool):
                tags[key[:MAX_TAG_KEY]] = str(value)[:MAX_TAG_VALUE]
    if header:
        for part in header.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if sep and key:
                tags[key[:MAX_TAG_KEY]] = value.strip()[:MAX_TAG_VALUE]
    if len(tags) > MAX_TAGS:
        tags = dict(list(tags.items())[:MAX_TAGS])
    return tags


class CapturePolicy:
    """On or off globally, per API key and per request (``x-retort-log: off``); sampled."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        sample_rate: float = 1.0,
        disabled_keys: Iterable[str] = (),
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError("promptlog.sample_rate must be within [0, 1]")
        self.enabled = enabled
        self.sample_rate = sample_rate
        self.disabled_keys = frozenset(disabled_keys)

    @classmethod
    def from_settings(cls, settings: PromptLogSettings) -> CapturePolicy:
        return cls(
            enabled=settings.enabled,
            sample_rate=settings.sample_rate,
            disabled_keys=settings.disabled_keys,
        )

    def should_capture(
        self, request_id: str, key_id: str | None = None, header: str | None = None
    ) -> bool:
        """Whether to record this request (``header``: the ``x-retort-log`` value)."""
        if not self.enabled:
            return False
        if header is not None and header.strip().lower() in _OFF:
            return False
        if key_id is not None and key_id in self.disabled_keys:
            return False
        return sample(request_id, self.sample_rate)


async def run_retention(
    store: PromptStore, retention_days: float, *, interval_s: float = 3600.0
) -> None:
    """Purge records older than ``retention_days`` now and every ``interval_s`` after,
    until cancelled (run it as a lifespan task). Failures are logged and retried."""
    if retention_days <= 0:
        raise ValueError("retention_days must be positive")
    while True:
        try:
            deleted = await store.purge_older_than(retention_days)
            if deleted:
                log.info("prompt log: purged %d records older than %g days", deleted,
                         retention_days)  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("prompt log: retention purge failed", exc_info=True)
        await asyncio.sleep(interval_s)
