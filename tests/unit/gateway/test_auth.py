"""API keys, admin keys and per-key limits (in memory, and shared through a real Redis)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from gateway.auth.keys import (
    APIKey,
    AuthenticationError,
    Authenticator,
    AuthSettings,
    PermissionDeniedError,
    generate_key,
    hash_key,
    is_loopback,
)
from gateway.auth.limits import (
    KeyLimits,
    LimiterUnavailableError,
    LimitsSettings,
    MemoryRateLimiter,
    RateLimitedError,
    build_rate_limiter,
)
from gateway.auth.redis_limits import RedisRateLimiter
from gateway.errors import APIError, error_response, to_api_error
from loadtest.servers import free_port, redis_server
from tests import waits
from tests.services import service
from tests.unit.gateway.promptlog.docs import undocumented_fields

ROOT = Path(__file__).resolve().parents[3]
USER_KEY, ADMIN_KEY = "sk-user-0123456789", "sk-admin-0123456789"


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(
        AuthSettings(
            api_keys=[
                APIKey(id="user", sha256=hash_key(USER_KEY), rpm=5),
                APIKey(id="ops", sha256=hash_key(ADMIN_KEY), admin=True),
            ]
        )
    )


# -- keys ----------------------------------------------------------------------------------


def test_hash_and_generate() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    key, digest = generate_key()
    assert key.startswith("sk-retort-")
    assert len(key) > 40
    assert digest == hash_key(key)


def test_check(auth: Authenticator) -> None:
    assert auth.enabled
    assert auth.has_admin
    user = auth.check(f"Bearer {USER_KEY}")
    assert user is not None
    assert user.id == "user"
    assert not user.admin
    assert auth.check(f"bearer   {ADMIN_KEY} ") == auth.check(f"Bearer {ADMIN_KEY}")
    for bad in (None, "", "Bearer", "Bearer ", f"Basic {USER_KEY}", USER_KEY, "Bearer sk-nope"):
        assert auth.check(bad) is None


def test_authenticate(auth: Authenticator) -> None:
    key = auth.authenticate(f"Bearer {USER_KEY}")
    assert key is not None
    assert key.id == "user"
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate("Bearer wrong")
    err = info.value
    assert (err.status_code, err.type, err.code) == (401, "authentication_error", "invalid_api_key")
    assert Authenticator().authenticate(None) is None  # no keys configured: auth is off
    assert not Authenticator().enabled


def test_admin_with_admin_keys(auth: Authenticator) -> None:
    key = auth.authorize_admin(f"Bearer {ADMIN_KEY}", "10.0.0.1")
    assert key is not None
    assert key.admin
    with pytest.raises(PermissionDeniedError) as info:
        auth.authorize_admin(f"Bearer {USER_KEY}", "127.0.0.1")
    assert (info.value.status_code, info.value.type) == (403, "permission_error")
    with pytest.raises(AuthenticationError):
        auth.authorize_admin(None, "127.0.0.1")


def test_admin_without_admin_keys_is_loopback_only() -> None:
    auth = Authenticator(AuthSettings(api_keys=[APIKey(id="u", sha256=hash_key(USER_KEY))]))
    for inside in ("127.0.0.1", "127.8.0.1", "::1", "::ffff:127.0.0.1", "localhost"):
        auth.authorize_admin(None, inside)
    outside: tuple[str | None, ...] = ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", None)
    for host in (*outside, "testclient"):
        with pytest.raises(PermissionDeniedError):
            auth.authorize_admin(f"Bearer {USER_KEY}", host)
    assert not is_loopback("not-an-ip")


def test_bad_key_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 hex"):
        Authenticator(AuthSettings(api_keys=[APIKey(id="a", sha256="abc")]))
    twice = [APIKey(id="a", sha256=hash_key("x")), APIKey(id="a", sha256=hash_key("y"))]
    with pytest.raises(ValueError, match="twice"):
        Authenticator(AuthSettings(api_keys=twice))
    with pytest.raises(ValueError, match="cannot read"):
        Authenticator(AuthSettings(api_keys_file=str(tmp_path / "missing.yaml")))
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"api_keys": [{"id": "a", "sha256": "b", "rps": 1}]}, AuthSettings)


def test_keys_file(tmp_path: Path) -> None:
    secret = tmp_path / "keys.yaml"
    secret.write_text(f"api_keys:\n  - id: svc\n    sha256: {hash_key('k1')}\n    tpm: 100\n")
    auth = Authenticator(AuthSettings(api_keys_file=str(secret)))
    key = auth.check("Bearer k1")
    assert key is not None
    assert key.id == "svc"
    assert auth.limits["svc"] == KeyLimits(tpm=100)


def test_settings_are_documented() -> None:
    for cls in (APIKey, AuthSettings, LimitsSettings):
        assert undocumented_fields(cls) == [], cls


def test_errors_map_to_the_openai_shape() -> None:
    err = RateLimitedError(2.2, "rpm")
    assert isinstance(err, APIError)
    assert to_api_error(err) is err
    assert (err.status_code, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert err.headers == {"Retry-After": "3"}
    assert RateLimitedError(0.0).headers == {"Retry-After": "1"}
    resp = error_response(err.status_code, err.message, err.type, err.param, err.code, err.headers)
    body = json.loads(resp.content)
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert resp.headers["Retry-After"] == "3"


# -- in-memory limits ---------------------------------------------------------------------


async def test_memory_rpm() -> None:
    limiter = MemoryRateLimiter(key_limits={"k": KeyLimits(rpm=3)})
    for _ in range(3):
        await (await limiter.acquire("k")).release()
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire("k")
    assert 0 < info.value.retry_after_s <= 60
    assert info.value.limit == "rpm"
    await limiter.acquire("other")  # other keys (unlimited) are unaffected
    await limiter.acquire(None)


async def test_memory_tpm_with_refund() -> None:
    limiter = MemoryRateLimiter(key_limits={"k": KeyLimits(tpm=1000)})
    lease = await limiter.acquire("k", est_tokens=800)
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire("k", est_tokens=300)
    assert info.value.limit == "tpm"
    await lease.release(actual_tokens=100)  # the estimate was high: 700 tokens come back
    await lease.release(actual_tokens=999)  # idempotent
    await limiter.acquire("k", est_tokens=800)
    with pytest.raises(RateLimitedError, match="Request too large"):
        await limiter.acquire("k", est_tokens=5000)


async def test_memory_concurrency() -> None:
    limiter = MemoryRateLimiter(key_limits={"k": KeyLimits(max_concurrent=2)})
    a = await limiter.acquire("k")
    async with await limiter.acquire("k"):
        with pytest.raises(RateLimitedError) as info:
            await limiter.acquire("k")
        assert info.value.limit == "concurrency"
    await limiter.acquire("k")  # the context manager released its slot
    await a.release()
    await limiter.acquire("k")


async def test_defaults_apply_to_keys_without_limits(auth: Authenticator) -> None:
    limiter = build_rate_limiter(LimitsSettings(default_rpm=1, default_tpm=50), auth)
    assert isinstance(limiter, MemoryRateLimiter)
    assert limiter.limits_for("user") == KeyLimits(rpm=5, tpm=50)
    assert limiter.limits_for("ops") == KeyLimits(rpm=1, tpm=50)
    await limiter.acquire("ops", 10)
    with pytest.raises(RateLimitedError):
        await limiter.acquire("ops", 10)
    with pytest.raises(ValueError, match="divide 60"):
        MemoryRateLimiter(LimitsSettings(bucket_s=7))


# -- Redis: limits shared across replicas --------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with service(redis_server()) as url:
        yield url


def _limiter(url: str, prefix: str, **limits: int) -> RedisRateLimiter:
    settings = LimitsSettings(redis_url=url, key_prefix=prefix)
    return RedisRateLimiter(settings, {"k": KeyLimits(**limits)})


async def test_redis_two_replicas_share_one_rpm_budget(redis_url: str) -> None:
    a, b = _limiter(redis_url, "t1", rpm=5), _limiter(redis_url, "t1", rpm=5)
    try:
        for limiter in (a, b, a, b, a):
            await limiter.acquire("k")
        for limiter in (a, b):
            with pytest.raises(RateLimitedError) as info:
                await limiter.acquire("k")
            assert info.value.limit == "rpm"
            assert 0 < info.value.retry_after_s <= 60
            assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    finally:
        await a.close()
        await b.close()


async def test_redis_shared_concurrency_and_tokens(redis_url: str) -> None:
    a = _limiter(redis_url, "t2", max_concurrent=2, tpm=1000)
    b = _limiter(redis_url, "t2", max_concurrent=2, tpm=1000)
    try:
        la = await a.acquire("k", 400)
        lb = await b.acquire("k", 400)
        with pytest.raises(RateLimitedError) as info:
            await a.acquire("k", 10)
        assert info.value.limit == "concurrency"
        await la.release(actual_tokens=50)  # frees a slot and refunds 350 tokens
        with pytest.raises(RateLimitedError) as info:
            await b.acquire("k", 600)
        assert info.value.limit == "tpm"  # 450 used + 600 > 1000
        lc = await b.acquire("k", 500)
        await lb.release()
        await lc.release()
        with pytest.raises(RateLimitedError, match="Request too large"):
            await a.acquire("k", 2000)
    finally:
        await a.close()
        await b.close()


async def test_redis_lease_ttl_frees_a_crashed_replicas_slot(redis_url: str) -> None:
    settings = LimitsSettings(redis_url=redis_url, key_prefix="t3", lease_ttl_s=0.3)
    limiter = RedisRateLimiter(settings, {"k": KeyLimits(max_concurrent=1)})
    try:
        await limiter.acquire("k")  # never released: its replica "crashed"
        with pytest.raises(RateLimitedError):
            await limiter.acquire("k")

        async def admitted() -> bool:
            try:
                await limiter.acquire("k")
            except RateLimitedError:
                return False
            return True

        await waits.until(admitted, timeout_s=5.0, every_s=0.05)  # after lease_ttl_s
    finally:
        await limiter.close()


OTHER_PROCESS = """
import asyncio, sys
from gateway.auth.limits import KeyLimits, LimitsSettings, RateLimitedError
from gateway.auth.redis_limits import RedisRateLimiter

async def main():
    lim = RedisRateLimiter(LimitsSettings(redis_url=sys.argv[1], key_prefix="t4"),
                           {"k": KeyLimits(rpm=5)})
    ok = 0
    for _ in range(3):
        try:
            await lim.acquire("k")
            ok += 1
        except RateLimitedError:
            pass
    await lim.close()
    print(ok)

asyncio.run(main())
"""


async def test_redis_budget_shared_with_another_process(redis_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OTHER_PROCESS, redis_url, cwd=ROOT, stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert out.decode().strip() == "3"
    here = _limiter(redis_url, "t4", rpm=5)
    try:
        await here.acquire("k")
        await here.acquire("k")
        with pytest.raises(RateLimitedError):
            await here.acquire("k")
    finally:
        await here.close()


async def test_redis_down_fails_open_or_closed() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    open_ = RedisRateLimiter(LimitsSettings(redis_url=url), {"k": KeyLimits(rpm=2)})
    closed = RedisRateLimiter(
        LimitsSettings(redis_url=url, fail_open=False), {"k": KeyLimits(rpm=2)}
    )
    try:
        # Open: the key's limits still hold, per replica.
        for _ in range(2):
            await (await open_.acquire("k")).release()
        with pytest.raises(RateLimitedError):
            await open_.acquire("k")
        assert open_.degraded
        with pytest.raises(LimiterUnavailableError) as refused:
            await closed.acquire("k")
        assert refused.value.status_code == 503
        assert refused.value.headers["Retry-After"] == "1"
        assert closed.degraded
    finally:
        await open_.close()
        await closed.close()
    assert isinstance(build_rate_limiter(LimitsSettings(redis_url=url)), RedisRateLimiter)
