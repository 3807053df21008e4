"""Per-key limits shared by every replica through Redis (``limits.redis_url``).

One atomic Lua script per acquire (``acquire.lua`` beside this file); concurrent leases are
a sorted set whose entries expire after ``limits.lease_ttl_s``, so a crashed replica cannot
hold a slot forever.

When Redis goes away the limiter is *degraded* (``retort_limits_degraded`` 1) and follows
``limits.fail_open``: open, each replica enforces every key's limits by itself (a
:class:`~gateway.auth.limits.MemoryRateLimiter`, so failing open never means unlimited);
closed, requests get 503 ``limiter_unavailable`` with ``Retry-After``. While degraded,
requests do not touch Redis; a background probe pings it every ``limits.probe_interval_s``
and, once it answers, releases the leases that ended meanwhile and turns the shared limits
back on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.auth.limits import (
    KeyLimits,
    LimiterUnavailableError,
    LimitLease,
    LimitsSettings,
    MemoryRateLimiter,
    RateLimitedError,
    RateLimiter,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.metrics import Metrics

__all__ = ["RedisRateLimiter"]

log = logging.getLogger("retort.auth")

_HERE = Path(__file__).parent

_PENDING_RELEASES = 10_000
"""Leases whose release waits for Redis to return (past it, the oldest expire by TTL)."""


class RedisRateLimiter(RateLimiter):
    """Limits shared by every replica through Redis (``limits.redis_url``); per replica
    while Redis is unreachable (see the module's docstring)."""

    def __init__(
        self,
        settings: LimitsSettings,
        key_limits: Mapping[str, KeyLimits] | None = None,
        *,
        client: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(settings, key_limits)
        if client is None:
            if not settings.redis_url:
                raise ValueError("RedisRateLimiter needs limits.redis_url")
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # One quick retry (a pooled connection Redis closed when it restarted), not
            # redis-py's default ten with backoff: a request must not wait seconds on it.
            client = aioredis.Redis.from_url(
                settings.redis_url,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
                retry=Retry(NoBackoff(), 1),
            )
        self._redis = client
        self._acquire_script = client.register_script((_HERE / "acquire.lua").read_text())
        self._release_script = client.register_script((_HERE / "release.lua").read_text())
        self._last_error_log = 0.0
        self.metrics = metrics
        self.local = MemoryRateLimiter(settings, key_limits)
        """The per-replica limits while Redis is unreachable (``fail_open``)."""
        self._degraded = False
        self._probe: asyncio.Task[None] | None = None
        self._pending: collections.deque[tuple[str, str, str, int, int]] = collections.deque(
            maxlen=_PENDING_RELEASES
        )
        if metrics is not None:
            metrics.set_limits_degraded(False)

    @property
    def degraded(self) -> bool:
        """Whether Redis counts as unreachable (limits per replica, or refused)."""
        return self._degraded

    def _keys(self, key_id: str) -> tuple[str, str, str]:
        # One hash tag per key id: a key's three Redis keys live on one cluster slot.
        base = f"{self.settings.key_prefix}:{{{key_id}}}"
        return f"{base}:req", f"{base}:tok", f"{base}:conc"

    def _redis_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            how = "limits per replica" if self.settings.fail_open else "requests refused"
            log.warning(
                "rate limiter: Redis unavailable (%s); limits %s until it is back", exc, how
            )
        if not self._degraded:
            self._degraded = True
            if self.metrics is not None:
                self.metrics.set_limits_degraded(True)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._wait_for_redis(), name="limits-redis-probe"
            )

    async def _wait_for_redis(self) -> None:
        """Ping Redis until it answers, release what ended meanwhile, share limits again."""
        from redis.exceptions import RedisError

        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self._redis.ping()
                while self._pending:
                    tok, conc, lease_id, bucket, delta = self._pending[0]
                    await self._release_script(keys=[tok, conc], args=[lease_id, bucket, delta])
                    self._pending.popleft()
            except (TimeoutError, RedisError, OSError):
                continue
            self._degraded = False
            if self.metrics is not None:
                self.metrics.set_limits_degraded(False)
            log.warning("rate limiter: Redis is back; limits are shared again")
            return

    def _degraded_lease(self, key_id: str, limits: KeyLimits, est_tokens: int) -> LimitLease:
        if not self.settings.fail_open:
            raise LimiterUnavailableError(self.settings.probe_interval_s)
        return self.local._check(key_id, limits, est_tokens, time.time())

    async def _acquire(self, key_id: str, limits: KeyLimits, est_tokens: int) -> LimitLease:
        from redis.exceptions import RedisError

        if self._degraded:
            return self._degraded_lease(key_id, limits, est_tokens)
        lease_id = uuid.uuid4().hex
        s = self.settings
        try:
            admitted, value, reason = await self._acquire_script(
                keys=list(self._keys(key_id)),
                args=[
                    limits.rpm or 0,
                    limits.tpm or 0,
                    limits.max_concurrent or 0,
                    est_tokens,
                    round(s.bucket_s * 1000),
                    self.n_buckets,
                    round(s.lease_ttl_s * 1000),
                    lease_id,
                ],
            )
        except (TimeoutError, RedisError, OSError) as exc:
            self._redis_failed(exc)
            return self._degraded_lease(key_id, limits, est_tokens)
        if int(admitted) != 1:
            why = reason.decode() if isinstance(reason, bytes) else str(reason)
            raise RateLimitedError(int(value) / 1000.0, why)
        return LimitLease(self, key_id, est_tokens, int(value), lease_id)

    async def _release(self, lease: LimitLease, actual_tokens: int | None) -> None:
        from redis.exceptions import RedisError

        assert lease.key_id is not None
        _, tok, conc = self._keys(lease.key_id)
        delta = 0 if actual_tokens is None else int(actual_tokens) - lease.est_tokens
        pending = (tok, conc, lease.lease_id, lease.bucket, delta)
        if self._degraded:
            self._pending.append(pending)  # released when Redis is back
            return
        try:
            await self._release_script(keys=[tok, conc], args=[lease.lease_id, lease.bucket, delta])
        except (TimeoutError, RedisError, OSError) as exc:
            self._pending.append(pending)
            self._redis_failed(exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._redis.aclose()
