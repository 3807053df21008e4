"""Per-key limits: requests/min, tokens/min and concurrent requests.

Limits are counted per key over a sliding one-minute window of ``limits.bucket_s`` buckets
(the window spans the last ``60 / bucket_s`` buckets). By default they are counted in
memory, per process (:class:`MemoryRateLimiter`); with ``limits.redis_url`` set, every
replica shares them through Redis (:class:`gateway.auth.redis_limits.RedisRateLimiter`,
which also says what happens when Redis goes away).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import msgspec

from gateway.errors import APIError, ServiceUnavailableError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from gateway.auth.keys import Authenticator
    from gateway.metrics import Metrics

__all__ = [
    "KeyLimits",
    "LimitLease",
    "LimiterUnavailableError",
    "LimitsSettings",
    "MemoryRateLimiter",
    "RateLimitedError",
    "RateLimiter",
    "build_rate_limiter",
]

log = logging.getLogger("retort.auth")


class RateLimitedError(APIError):
    """429: over the key's requests/min, tokens/min or concurrency limit.

    ``headers`` holds ``Retry-After`` (whole seconds, rounded up, at least 1).
    """

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, retry_after_s: float, limit: str = "rpm", message: str | None = None):
        what = {
            "rpm": "requests per minute",
            "tpm": "tokens per minute",
            "tpm_too_large": "tokens per minute",
            "concurrency": "concurrent requests",
        }.get(limit, limit)
        if message is None:
            if limit == "tpm_too_large":
                message = (
                    "Request too large: its estimated tokens exceed this key's "
                    "tokens-per-minute limit."
                )
            else:
                message = f"Rate limit reached for {what}. Retry after {retry_after_s:.1f}s."
        super().__init__(message)
        self.retry_after_s = max(0.0, retry_after_s)
        self.limit = limit
        self.headers: dict[str, str] = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class LimiterUnavailableError(ServiceUnavailableError):
    """503: Redis is unreachable and ``limits.fail_open`` is false."""

    code = "limiter_unavailable"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("Rate limiter unavailable (its Redis cannot be reached); retry later.")
        self.headers: dict[str, str] = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class LimitsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    redis_url: str | None = None
    """Share limits across replicas through this Redis (``redis://host:6379/0``); in memory,
    per process, when unset."""
    key_prefix: str = "retort:limits"
    """Redis key prefix."""
    default_rpm: int | None = None
    """Requests per minute for keys without their own ``rpm``."""
    default_tpm: int | None = None
    """Tokens per minute for keys without their own ``tpm``."""
    default_max_concurrent: int | None = None
    """Concurrent requests for keys without their own ``max_concurrent``."""
    bucket_s: float = 5.0
    """Granularity of the one-minute sliding window (it divides 60)."""
    lease_ttl_s: float = 900.0
    """Redis: a concurrency slot not released after this long is freed (crashed replica)."""
    fail_open: bool = True
    """Redis unreachable: ``true`` enforces each key's limits per replica (in memory) until
    Redis is back; ``false`` refuses requests with 503 ``limiter_unavailable``."""
    probe_interval_s: float = 1.0
    """While Redis is unreachable, how often it is pinged to notice its return."""


class KeyLimits(msgspec.Struct, frozen=True, kw_only=True):
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_concurrent is None


class LimitLease:
    """An admitted request's hold on its key's budget; :meth:`release` it when done.

    Releasing returns the concurrency slot and corrects the token count from the estimate
    to ``actual_tokens``. Idempotent; also an async context manager.
    """

    __slots__ = ("_limiter", "_released", "bucket", "est_tokens", "key_id", "lease_id")

    def __init__(
        self,
        limiter: RateLimiter | None,
        key_id: str | None,
        est_tokens: int,
        bucket: int,
        lease_id: str = "",
    ) -> None:
        self._limiter = limiter
        self._released = False
        self.key_id = key_id
        self.est_tokens = est_tokens
        self.bucket = bucket
        self.lease_id = lease_id

    @property
    def released(self) -> bool:
        return self._released

    async def release(self, actual_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        if self._limiter is not None:
            await self._limiter._release(self, actual_tokens)

    async def __aenter__(self) -> LimitLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class RateLimiter:
    """Per-key limits; the base class admits everything (limits off)."""

    def __init__(
        self,
        settings: LimitsSettings | None = None,
        key_limits: Mapping[str, KeyLimits] | None = None,
    ) -> None:
        self.settings = s = settings or LimitsSettings()
        if s.bucket_s <= 0 or 60.0 / s.bucket_s != round(60.0 / s.bucket_s):
            raise ValueError("limits.bucket_s must divide 60")
        self.n_buckets = round(60.0 / s.bucket_s)
        self._key_limits = dict(key_limits or {})
        self._defaults = KeyLimits(
            rpm=s.default_rpm, tpm=s.default_tpm, max_concurrent=s.default_max_concurrent
        )
        self._resolved: dict[str, KeyLimits] = {}

    def limits_for(self, key_id: str) -> KeyLimits:
        got = self._resolved.get(key_id)
        if got is None:
            own = self._key_limits.get(key_id, KeyLimits())
            d = self._defaults
            got = KeyLimits(
                rpm=own.rpm if own.rpm is not None else d.rpm,
                tpm=own.tpm if own.tpm is not None else d.tpm,
                max_concurrent=(
                    own.max_concurrent if own.max_concurrent is not None else d.max_concurrent
                ),
            )
            self._resolved[key_id] = got
        return got

    async def acquire(self, key_id: str | None, est_tokens: int = 0) -> LimitLease:
        """Admit one request of ``key_id`` costing ``est_tokens`` (prompt + max completion),
        or raise :class:`RateLimitedError`. ``None`` (auth off) is never limited."""
        if key_id is None:
            return LimitLease(None, None, est_tokens, 0)
        limits = self.limits_for(key_id)
        if limits.unlimited:
            return LimitLease(None, key_id, est_tokens, 0)
        return await self._acquire(key_id, limits, max(0, int(est_tokens)))

    async def _acquire(self, key_id: str, limits: KeyLimits, est_tokens: int) -> LimitLease:
        return LimitLease(None, key_id, est_tokens, 0)

    async def _release(self, lease: LimitLease, actual_tokens: int | None) -> None:
        return None

    async def close(self) -> None:
        return None


def _retry_after_s(
    buckets: list[tuple[int, int]],
    total: int,
    need: int,
    limit: int,
    n: int,
    bucket_s: float,
    now: float,
) -> float:
    """Seconds until enough of the oldest buckets leave the window to admit ``need``."""
    acc = 0
    for bucket, value in buckets:
        acc += value
        if total - acc + need <= limit:
            return max(0.0, (bucket + n) * bucket_s - now)
    return n * bucket_s


class _KeyWindow:
    __slots__ = ("concurrent", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.concurrent = 0


class MemoryRateLimiter(RateLimiter):
    """Limits counted in this process (per replica, per worker)."""

    def __init__(
        self,
        settings: LimitsSettings | None = None,
        key_limits: Mapping[str, KeyLimits] | None = None,
    ) -> None:
        super().__init__(settings, key_limits)
        self._windows: dict[str, _KeyWindow] = {}

    def _check(self, key_id: str, limits: KeyLimits, est: int, now: float) -> LimitLease:
        w = self._windows.get(key_id)
        if w is None:
            w = self._windows[key_id] = _KeyWindow()
        n, bs = self.n_buckets, self.settings.bucket_s
        b = math.floor(now / bs)
        oldest = b - n + 1
        for counts in (w.requests, w.tokens):
            for stale in [k for k in counts if k < oldest]:
                del counts[stale]
        if limits.rpm is not None:
            total = sum(w.requests.values())
            if total + 1 > limits.rpm:
                retry = _retry_after_s(sorted(w.requests.items()), total, 1, limits.rpm, n, bs, now)
                raise RateLimitedError(retry, "rpm")
        if limits.tpm is not None:
            if est > limits.tpm:
                raise RateLimitedError(n * bs, "tpm_too_large")
            total = sum(w.tokens.values())
            if total + est > limits.tpm:
                retry = _retry_after_s(sorted(w.tokens.items()), total, est, limits.tpm, n, bs, now)
                raise RateLimitedError(retry, "tpm")
        if limits.max_concurrent is not None and w.concurrent >= limits.max_concurrent:
            raise RateLimitedError(1.0, "concurrency")
        if limits.rpm is not None:
            w.requests[b] = w.requests.get(b, 0) + 1
        if limits.tpm is not None:
            w.tokens[b] = w.tokens.get(b, 0) + est
        if limits.max_concurrent is not None:
            w.concurrent += 1
        return LimitLease(self, key_id, est, b)

    async def _acquire(self, key_id: str, limits: KeyLimits, est_tokens: int) -> LimitLease:
        return self._check(key_id, limits, est_tokens, time.time())

    async def _release(self, lease: LimitLease, actual_tokens: int | None) -> None:
        assert lease.key_id is not None
        w = self._windows.get(lease.key_id)
        if w is None:
            return
        limits = self.limits_for(lease.key_id)
        if limits.max_concurrent is not None and w.concurrent > 0:
            w.concurrent -= 1
        if actual_tokens is not None and limits.tpm is not None and lease.bucket in w.tokens:
            w.tokens[lease.bucket] = max(
                0, w.tokens[lease.bucket] + int(actual_tokens) - lease.est_tokens
            )


def build_rate_limiter(
    settings: LimitsSettings | None,
    authenticator: Authenticator | None = None,
    metrics: Metrics | None = None,
) -> RateLimiter:
    """The limiter the settings ask for: Redis when ``redis_url`` is set, else in memory."""
    settings = settings or LimitsSettings()
    key_limits = authenticator.limits if authenticator is not None else {}
    if settings.redis_url:
        from gateway.auth.redis_limits import RedisRateLimiter

        return RedisRateLimiter(settings, key_limits, metrics=metrics)
    return MemoryRateLimiter(settings, key_limits)
