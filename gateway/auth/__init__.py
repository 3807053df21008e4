"""Who may call, and how much: API keys (:mod:`gateway.auth.keys`) and per-key limits
(:mod:`gateway.auth.limits`, and :mod:`gateway.auth.redis_limits` with its Redis scripts
``acquire.lua`` and ``release.lua``).
The guards that apply them to routes are in :mod:`gateway.guards`."""

from gateway.auth.keys import (
    APIKey,
    AuthenticationError,
    Authenticator,
    AuthSettings,
    KeyInfo,
    PermissionDeniedError,
    generate_key,
    hash_key,
    is_loopback,
)
from gateway.auth.limits import (
    KeyLimits,
    LimiterUnavailableError,
    LimitLease,
    LimitsSettings,
    MemoryRateLimiter,
    RateLimitedError,
    RateLimiter,
    build_rate_limiter,
)
from gateway.auth.redis_limits import RedisRateLimiter

__all__ = [
    "APIKey",
    "AuthSettings",
    "AuthenticationError",
    "Authenticator",
    "KeyInfo",
    "KeyLimits",
    "LimitLease",
    "LimiterUnavailableError",
    "LimitsSettings",
    "MemoryRateLimiter",
    "PermissionDeniedError",
    "RateLimitedError",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "generate_key",
    "hash_key",
    "is_loopback",
]
