"""``retort serve`` as a real process (fake engine, real uvicorn, real SQLite log): graceful
drain on SIGTERM, API keys, limits and redaction through the official ``openai`` client, and
limits shared by two gateway processes through a real Redis (Debian ``redis-server``)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from loadtest.servers import FAKE_MODEL, Gateway, fake_gateway_config, redis_server, start_gateway
from retort.db.filters import RowFilter
from retort.db.store import PromptStore
from tests.services import service

MODEL = FAKE_MODEL
READY_TIMEOUT_S = 60.0
USER_KEY = "sk-user-0123456789abcdef"
LIMITED_KEY = "sk-limited-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"


def openai_client(gw: Gateway, key: str = "unused", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kwargs)


def log_rows(gw: Gateway, **filters: Any) -> list[dict[str, Any]]:
    async def query() -> list[dict[str, Any]]:
        async with PromptStore(f"sqlite+aiosqlite:///{gw.home}/retort.db") as store:
            return await store.query(RowFilter(**filters))

    return asyncio.run(query())


def wait_rows(gw: Gateway, n: int, timeout_s: float = 10.0, **filters: Any) -> list[dict[str, Any]]:
    """Poll the log (flushed every ``flush_interval_s``) until it holds ``n`` rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = log_rows(gw, **filters)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def start_fake(tmp: Path, name: str, config: dict[str, Any]) -> Gateway:
    return start_gateway(tmp, name, fake_gateway_config(config), ready_timeout_s=READY_TIMEOUT_S)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """``gateways(name, config)`` starts one; every one started is stopped afterwards."""
    started: list[Gateway] = []

    def start(name: str, config: dict[str, Any]) -> Gateway:
        gw = start_fake(tmp_path, name, config)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def keys_config(*keys: dict[str, Any]) -> dict[str, Any]:
    """``auth:`` with each ``{"key": ..., **fields}`` stored as its sha256."""
    entries = []
    for k in keys:
        fields = {name: v for name, v in k.items() if name != "key"}
        entries.append({**fields, "sha256": hash_key(k["key"])})
    return {"api_keys": entries}


def chat(
    client: openai.OpenAI, content: str = "hello there", max_tokens: int = 4, **kwargs: Any
) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        **kwargs,
    )


# -- drain ------------------------------------------------------------------------------


def test_sigterm_drains_16_streams_then_exits_with_all_logged(
    gateways: Callable[..., Gateway],
) -> None:
    # 100 tokens at 25 ms: each stream takes about 2.5 s.
    gw = gateways(
        "drain", {"engine": {"fake_token_delay_s": 0.025}, "shutdown": {"drain_seconds": 30}}
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 100,
        "stream": True,
    }

    async def scenario() -> tuple[list[tuple[str, str]], int, int | None, bool]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as c:
            first = [asyncio.Event() for _ in range(16)]

            async def one(i: int) -> tuple[str, str]:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    parts = []
                    async for piece in r.aiter_text():
                        parts.append(piece)
                        first[i].set()
                    return r.headers["x-request-id"], "".join(parts)

            streams = [asyncio.create_task(one(i)) for i in range(16)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 30)
            gw.proc.send_signal(signal.SIGTERM)
            # A new client during the drain (its own connection): /ready and requests 503.
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as fresh:
                ready = 200
                deadline = time.monotonic() + 5
                while ready == 200 and time.monotonic() < deadline:
                    ready = (await fresh.get("/ready")).status_code
                    await asyncio.sleep(0.02)
                in_flight = not any(s.done() for s in streams)
                try:
                    new = await fresh.post(
                        "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}
                    )
                    new_status: int | None = new.status_code
                    if new_status == 503:
                        assert new.json()["error"]["code"] == "draining"
                except httpx.ConnectError:
                    new_status = None  # a refused connection is acceptable too
            return await asyncio.gather(*streams), ready, new_status, in_flight

    results, ready, new_status, in_flight = asyncio.run(scenario())
    assert in_flight, "the streams ended before the drain could be observed"
    assert ready == 503
    assert new_status in (503, None)
    assert len(results) == 16
    for _, text in results:
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        assert '"error"' not in text
    # uvicorn re-raises the SIGTERM it captured once it has shut down: -15 (or 0).
    assert gw.proc.wait(30) in (0, -signal.SIGTERM), gw.log_text()[-3000:]
    assert "drain: every request finished" in gw.log_text()
    rows = {r["request_id"]: r for r in log_rows(gw)}
    for rid, _ in results:
        assert rid in rows, f"stream {rid} missing from the prompt log"
        assert rows[rid]["status"] == "ok"
        assert rows[rid]["completion_tokens"] == 100
        assert rows[rid]["finish_reason"] == "length"
    assert len(rows) == 16  # the request refused during the drain was never admitted


# -- auth, limits and redaction (openai client) -------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_fake(
        tmp_path_factory.mktemp("keyed"),
        "keyed",
        {
            "auth": keys_config(
                {"id": "user", "key": USER_KEY},
                {"id": "limited", "key": LIMITED_KEY, "rpm": 3},
                {"id": "ops", "key": ADMIN_KEY, "admin": True},
            )
        },
    )
    yield gw
    gw.stop()


def test_missing_or_invalid_key_is_authentication_error(keyed: Gateway) -> None:
    no_key = {"Authorization": openai.Omit()}  # the client sends no Authorization at all
    for client, headers in (
        (openai_client(keyed), no_key),
        (openai_client(keyed, "sk-wrong-0123456789"), {}),
    ):
        with pytest.raises(openai.AuthenticationError) as exc:
            chat(client, extra_headers=headers)
        assert exc.value.status_code == 401
        assert exc.value.code == "invalid_api_key"
        assert exc.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=headers)
    assert chat(openai_client(keyed, USER_KEY)).choices[0].message.content
    assert [m.id for m in openai_client(keyed, USER_KEY).models.list()] == [MODEL]


def test_rpm_limit_is_rate_limit_error_with_retry_after(keyed: Gateway) -> None:
    client = openai_client(keyed, LIMITED_KEY)
    for _ in range(3):
        chat(client)
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client)
    assert exc.value.status_code == 429
    assert exc.value.code == "rate_limit_exceeded"
    assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
    # Streams are admitted (or not) before the first byte: the same error.
    with pytest.raises(openai.RateLimitError):
        chat(client, stream=True)
    # Other keys keep their own budget.
    chat(openai_client(keyed, USER_KEY))


def test_personal_data_and_secrets_are_redacted_in_the_log(keyed: Gateway) -> None:
    secrets = {
        "EMAIL": "jane.doe@example.com",
        "PHONE": "+1 415-555-0132",
        "CARD": "4111 1111 1111 1111",
        "API_KEY": "sk-proj-abcdefghijklmnopqrstuvwx0123",
    }
    content = (
        f"Mail {secrets['EMAIL']}, call {secrets['PHONE']}, card {secrets['CARD']}, "
        f"my key is {secrets['API_KEY']}."
    )
    client = openai_client(keyed, USER_KEY)
    resp = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4
    )
    rid = resp.headers["x-request-id"]
    # The completion passes through untouched (the fake engine does not echo the prompt).
    assert resp.parse().choices[0].message.content == "The quick brown fox"
    (row,) = wait_rows(keyed, 1, request_id=rid)
    stored = row["messages"][0]["content"]
    for kind, value in secrets.items():
        assert value not in stored
        assert f"[REDACTED:{kind}]" in stored, stored
    assert stored.startswith("Mail [REDACTED:EMAIL], call ")
    assert row["key_id"] == "user"
    assert USER_KEY not in str(row)
    # Not in the database files either (WAL included).
    for f in keyed.home.glob("retort.db*"):
        raw = f.read_bytes()
        for value in (*secrets.values(), USER_KEY):
            assert value.encode() not in raw, (f.name, value)


def test_admin_endpoints_need_an_admin_key(keyed: Gateway) -> None:
    body = {"lora_name": "x", "lora_path": "x"}
    with pytest.raises(openai.PermissionDeniedError) as exc:
        openai_client(keyed, USER_KEY).post("/load_lora_adapter", body=body, cast_to=httpx.Response)
    assert exc.value.status_code == 403
    with pytest.raises(openai.AuthenticationError):
        openai_client(keyed, "sk-wrong-0123456789").post(
            "/load_lora_adapter", body=body, cast_to=httpx.Response
        )
    admin_root = openai.OpenAI(base_url=keyed.url, api_key=USER_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        admin_root.get("/admin/adapters", cast_to=httpx.Response)
    # An admin key passes the guard (LoRA is on by default: the empty registry).
    admin_root = openai.OpenAI(base_url=keyed.url, api_key=ADMIN_KEY, max_retries=0)
    r = admin_root.get("/admin/adapters", cast_to=httpx.Response)
    assert r.status_code == 200
    assert r.json()["data"] == []


# -- limits shared through Redis ------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with service(redis_server()) as url:
        yield url


def two_gateways(
    gateways: Callable[..., Gateway], redis_url: str, prefix: str, key: dict[str, Any], **eng: Any
) -> tuple[Gateway, Gateway]:
    config = {
        "auth": keys_config({"id": "shared", "key": USER_KEY, **key}),
        "limits": {"redis_url": redis_url, "key_prefix": prefix, "fail_open": False},
        "engine": eng,
    }
    return gateways(f"{prefix}-a", config), gateways(f"{prefix}-b", config)


def test_redis_shares_one_rpm_budget_across_two_gateways(
    gateways: Callable[..., Gateway], redis_url: str
) -> None:
    n = 5
    a, b = two_gateways(gateways, redis_url, "rpm", {"rpm": n})
    clients = [openai_client(a, USER_KEY), openai_client(b, USER_KEY)]
    outcomes: list[tuple[int, str]] = []
    for i in range(2 * n + 2):
        try:
            chat(clients[i % 2])
            outcomes.append((i % 2, "ok"))
        except openai.RateLimitError as exc:
            outcomes.append((i % 2, f"429 retry-after={exc.response.headers['retry-after']}"))
    assert [o.split(" ")[0] for _, o in outcomes] == ["ok"] * n + ["429"] * (n + 2), outcomes
    assert all(int(o.rsplit("=", 1)[1]) >= 1 for _, o in outcomes if o != "ok")
    assert {g for g, o in outcomes if o == "ok"} == {0, 1}  # both replicas served some


def test_redis_shares_max_concurrent_across_two_gateways(
    gateways: Callable[..., Gateway], redis_url: str
) -> None:
    m = 3
    # 60 tokens at 50 ms: an admitted stream holds its slot for about 3 s.
    a, b = two_gateways(gateways, redis_url, "conc", {"max_concurrent": m}, fake_token_delay_s=0.05)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 60,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {USER_KEY}"}

    async def scenario() -> tuple[list[int], list[str]]:
        async with httpx.AsyncClient(timeout=30) as c:
            held: list[tuple[httpx.Response, Any]] = []
            statuses = []
            # One after another, alternating replicas: each is admitted or refused before
            # its first byte, well within the admitted streams' 3 s.
            for i in range(2 * m + 2):
                gw = (a, b)[i % 2]
                cm = c.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers)
                r = await cm.__aenter__()
                statuses.append(r.status_code)
                if r.status_code == 200:
                    held.append((r, cm))
                else:
                    await r.aread()
                    assert r.status_code == 429, r.text
                    assert "concurrent" in r.json()["error"]["message"]
                    await cm.__aexit__(None, None, None)
            texts = []
            for r, cm in held:
                texts.append((await r.aread()).decode())
                await cm.__aexit__(None, None, None)
            return statuses, texts

    statuses, texts = asyncio.run(scenario())
    assert statuses.count(200) == m, statuses
    assert statuses.count(429) == m + 2, statuses
    assert all(t.endswith("data: [DONE]\n\n") for t in texts)
    # Every slot was released: each replica admits again.
    for gw in (a, b):
        assert chat(openai_client(gw, USER_KEY), max_tokens=1).choices[0].finish_reason == "length"
