"""The request path's telemetry, end to end through the app (fake engine, real SQLite log):
prompt log records, feedback, cost header, API keys, limits, metrics and drain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.auth.keys import APIKey, AuthSettings, hash_key
from gateway.auth.limits import LimitsSettings
from gateway.engines.fake import FakeEngine
from gateway.pricing import ModelPrice, PricingSettings
from gateway.promptlog import PromptLogSettings
from gateway.settings import EngineSettings, Settings
from retort.db.filters import RowFilter
from retort.db.store import PromptStore
from tests.openai_schema import assert_valid

USER_KEY = "sk-user-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def make_settings(home: Path, **sections: Any) -> Settings:
    sections.setdefault("promptlog", PromptLogSettings(flush_interval_s=0.05))
    return Settings(
        home=str(home),
        engine=EngineSettings(kind="fake", max_model_len=64),
        **sections,
    )


async def arows(home: Path, **filters: Any) -> list[dict[str, Any]]:
    async with PromptStore(f"sqlite+aiosqlite:///{home}/retort.db") as store:
        return await store.query(RowFilter(**filters))


async def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 - polling the app's state
            await asyncio.sleep(0.01)


def rows(home: Path, **filters: Any) -> list[dict[str, Any]]:
    return asyncio.run(arows(home, **filters))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def client(home: Path) -> Iterator[TestClient[Any]]:
    settings = make_settings(
        home,
        pricing=PricingSettings(
            prices={"fake-model": ModelPrice(prompt_per_1m=1.0, completion_per_1m=2.0)}
        ),
    )
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as c:
        yield c


# -- prompt log -------------------------------------------------------------------------


def test_every_request_is_logged_with_its_fields(client: TestClient[Any], home: Path) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 5, "temperature": 0, "user": "u-1", "metadata": {"team": "a"}},
        headers={"x-retort-tags": "env=prod,team=b"},
    )
    assert r.status_code == 200
    body = r.json()
    rid = r.headers["x-request-id"]
    assert body["id"] == f"chatcmpl-{rid}"
    s = client.post(
        "/v1/completions",
        json={"model": "fake-model", "prompt": "abc", "max_tokens": 3, "stream": True},
    )
    assert s.status_code == 200
    assert s.text.endswith("data: [DONE]\n\n")
    client.__exit__(None, None, None)  # flush the log

    chat, comp = rows(home)
    assert chat["request_id"] == rid
    assert chat["endpoint"] == "chat"
    assert chat["messages"] == [{"role": "user", "content": "hello there"}]
    assert chat["completion"] == body["choices"][0]["message"]["content"]
    assert chat["finish_reason"] == body["choices"][0]["finish_reason"]
    assert chat["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert chat["completion_tokens"] == body["usage"]["completion_tokens"]
    assert chat["params"]["max_tokens"] == 5
    assert chat["params"]["temperature"] == 0
    assert chat["tags"] == {"team": "b", "env": "prod"}
    assert chat["user"] == "u-1"
    assert chat["status"] == "ok"
    assert chat["served_by"] == "engine"
    assert chat["adapter"] is None
    assert chat["latency_s"] >= chat["ttft_s"] > 0
    assert chat["cost_usd"] == pytest.approx(
        (chat["prompt_tokens"] * 1.0 + chat["completion_tokens"] * 2.0) / 1e6
    )
    assert comp["endpoint"] == "completions"
    assert comp["prompt"] == "abc"
    assert comp["completion_tokens"] == 3
    assert len(comp["completion"]) > 0
    assert comp["params"]["stream"] is True


def test_log_off_per_request_and_failures_flagged(client: TestClient[Any], home: Path) -> None:
    off = client.post("/v1/chat/completions", json=CHAT, headers={"x-retort-log": "off"})
    assert off.is_success
    too_long = {"model": "fake-model", "prompt": "word " * 200}
    r = client.post("/v1/completions", json=too_long)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    client.__exit__(None, None, None)
    (failed,) = rows(home)
    assert failed["status"] == "error"
    assert "context length" in failed["error"]
    assert failed["prompt"] == too_long["prompt"]


def test_client_request_id_is_kept(client: TestClient[Any], home: Path) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    assert r.json()["id"] == "chatcmpl-my-id-1"
    client.__exit__(None, None, None)
    assert [row["request_id"] for row in rows(home)] == ["my-id-1"]


# -- feedback ---------------------------------------------------------------------------


def test_feedback_by_request_id_or_response_id(client: TestClient[Any], home: Path) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    rid, resp_id = r.headers["x-request-id"], r.json()["id"]
    # Right after the response: the record may still be queued; feedback flushes it.
    f = client.post("/v1/feedback", json={"request_id": rid, "score": 1, "comment": "good"})
    assert f.status_code == 201, f.text
    assert f.json() == {"object": "feedback", "request_id": rid, "score": 1.0, "comment": "good"}
    by_response_id = client.post("/v1/feedback", json={"request_id": resp_id, "score": 0.5})
    assert by_response_id.status_code == 201
    client.__exit__(None, None, None)
    (row,) = rows(home)
    assert row["feedback_count"] == 2
    assert row["score"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"request_id": "no-such-request", "score": 1}, 404, "request_id"),
        ({"request_id": "x", "score": "high"}, 400, "score"),
        ({"score": 1}, 400, "request_id"),
        ({"request_id": "", "score": 1}, 400, "request_id"),
        ({"request_id": "x", "score": 1, "extra": 1}, 400, None),
        ([1, 2], 400, None),
    ],
)
def test_feedback_bad_input(
    client: TestClient[Any], body: Any, status: int, param: str | None
) -> None:
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param


def test_feedback_rejects_non_finite_scores(client: TestClient[Any]) -> None:
    r = client.post(
        "/v1/feedback",
        content=b'{"request_id": "x", "score": NaN}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400


# -- cost -------------------------------------------------------------------------------


def test_cost_header_matches_usage_and_prices(client: TestClient[Any]) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    usage = r.json()["usage"]
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert float(r.headers["x-retort-cost-usd"]) == pytest.approx(expected)
    assert_valid("CreateChatCompletionResponse", r.json())


# -- auth and limits ----------------------------------------------------------------------


@pytest.fixture
def keyed(home: Path) -> Iterator[TestClient[Any]]:
    settings = make_settings(
        home,
        auth=AuthSettings(
            api_keys=[
                APIKey(id="user", sha256=hash_key(USER_KEY), rpm=3),
                APIKey(id="slow", sha256=hash_key("sk-slow-0123456789"), max_concurrent=1),
                APIKey(id="ops", sha256=hash_key(ADMIN_KEY), admin=True),
            ]
        ),
        limits=LimitsSettings(),
    )
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_when_configured(keyed: TestClient[Any], home: Path) -> None:
    for headers in ({}, bearer("sk-wrong"), {"Authorization": USER_KEY}):
        r = keyed.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    # 401 comes before the body is even parsed.
    assert keyed.post("/v1/chat/completions", content=b"{oops").status_code == 401
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/v1/models", headers=bearer(USER_KEY)).status_code == 200
    assert keyed.get("/health").status_code == 200  # probes need no key
    r = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(USER_KEY))
    assert r.status_code == 200
    keyed.__exit__(None, None, None)
    (row,) = rows(home)
    assert row["key_id"] == "user"


def test_admin_needs_an_admin_key(keyed: TestClient[Any]) -> None:
    assert keyed.get("/admin/adapters").status_code == 401
    r = keyed.get("/admin/adapters", headers=bearer(USER_KEY))
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"
    # LoRA is on by default: an admin passes the guard and gets the (empty) registry.
    r = keyed.get("/admin/adapters", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": []}


def test_requests_per_minute_limit_gives_429_with_retry_after(keyed: TestClient[Any]) -> None:
    codes = [
        keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(USER_KEY)).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 200]
    r = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer(USER_KEY))
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # Another key has its own budget.
    assert keyed.get("/v1/models", headers=bearer(ADMIN_KEY)).status_code == 200


async def test_concurrency_limit_and_release(home: Path) -> None:
    settings = make_settings(
        home,
        auth=AuthSettings(
            api_keys=[APIKey(id="slow", sha256=hash_key("sk-slow-0123456789"), max_concurrent=1)]
        ),
    )
    engine = FakeEngine("fake-model", 64, token_delay_s=0.05)
    app = create_app(settings, engine=engine)
    headers = bearer("sk-slow-0123456789")
    body = {**CHAT, "max_tokens": 10, "stream": True}
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        gw = app.state.gateway
        first = asyncio.create_task(c.post("/v1/chat/completions", json=body, headers=headers))
        await wait_until(lambda: gw.inflight >= 1)
        r2 = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r2.status_code == 429
        assert "concurrent" in r2.json()["error"]["message"]
        assert int(r2.headers["retry-after"]) >= 1
        assert (await first).status_code == 200
        # The stream ended: its slot is free again.
        r3 = await c.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r3.status_code == 200


# -- metrics ----------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_cost(client: TestClient[Any]) -> None:
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "stream": True})
    text = client.get("/metrics").text
    assert 'retort_requests_total{adapter="none",model="fake-model",status="ok"} 2.0' in text
    assert "retort_cost_usd_total" in text
    assert 'retort_time_to_first_token_seconds_count{adapter="none",model="fake-model"} 2.0' in text
    assert 'retort_inflight_requests{model="fake-model"} 0.0' in text
    assert "retort_promptlog_queue_depth" in text


# -- drain ------------------------------------------------------------------------------


async def test_drain_finishes_streams_in_flight_and_refuses_new_ones(home: Path) -> None:
    settings = make_settings(home)
    engine = FakeEngine("fake-model", 64, token_delay_s=0.02)
    app = create_app(settings, engine=engine)
    body = {**CHAT, "max_tokens": 20, "stream": True}
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        gw = app.state.gateway

        async def one() -> str:
            async with c.stream("POST", "/v1/chat/completions", json=body) as s:
                assert s.status_code == 200
                return (await s.aread()).decode()

        streams = [asyncio.create_task(one()) for _ in range(4)]
        await wait_until(lambda: gw.inflight >= 4)
        drained = asyncio.create_task(gw.drain(10))
        await asyncio.sleep(0)
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "draining"
        assert (await c.get("/ready")).status_code == 503
        texts = await asyncio.gather(*streams)
        assert await drained is True
        assert all(t.endswith("data: [DONE]\n\n") for t in texts)
    # The lifespan's shutdown flushed the log: all 4 are there.
    assert len(await arows(home, status="ok")) == 4


def test_promptlog_disabled_records_nothing(home: Path) -> None:
    settings = make_settings(home, promptlog=PromptLogSettings(enabled=False))
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        f = c.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "score": 1})
        assert f.status_code == 404
    assert not (home / "retort.db").exists()
