"""The HTTP surface over the deterministic fake engine, validated against OpenAI's schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.openai_schema import assert_valid

if TYPE_CHECKING:
    from litestar.testing import TestClient

    from gateway.engines.fake import FakeEngine

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


def events(body: str) -> list[Any]:
    out: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_non_streaming(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["content"] == "The quick brown fox"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4


def test_chat_max_completion_tokens_wins(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 9, "max_completion_tokens": 2}
    )
    assert r.json()["usage"]["completion_tokens"] == 2


def test_chat_n_and_logprobs(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "n": 3, "max_tokens": 2, "logprobs": True, "top_logprobs": 2},
    )
    body = r.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    lp = body["choices"][0]["logprobs"]["content"]
    assert len(lp) == 2
    assert len(lp[0]["top_logprobs"]) == 2
    assert body["usage"]["completion_tokens"] == 6


def test_chat_stream_with_usage(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    for c in chunks:
        assert_valid("CreateChatCompletionStreamResponse", c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "The quick brown"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1


def test_chat_stream_without_usage_has_no_usage(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
    assert all("usage" not in c for c in events(r.text)[:-1])


def test_completions(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "fake-model", "prompt": "a b c", "max_tokens": 3, "logprobs": 1},
    )
    body = r.json()
    assert_valid("CreateCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["text"] == "The quick brown"
    assert choice["logprobs"]["text_offset"] == [0, 3, 9]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completions_token_prompt_and_echo(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": [1, 2], "max_tokens": 1}
    )
    assert r.json()["usage"]["prompt_tokens"] == 2
    r = client.post(
        "/v1/completions",
        json={"model": "fake-model", "prompt": ["x y"], "max_tokens": 1, "echo": True},
    )
    assert r.json()["choices"][0]["text"] == "x yThe"


def test_completions_stream(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "model": "fake-model",
            "prompt": "hi",
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    for c in evs[:-1]:
        for choice in c["choices"]:
            choice.setdefault("finish_reason", "length")  # left out until the last chunk
        assert_valid("CreateCompletionResponse", c)
    assert "finish_reason" not in events(r.text)[0]["choices"][0]
    assert "".join(c["choices"][0]["text"] for c in evs[:-2]) == "The quick"
    assert evs[-2]["usage"]["completion_tokens"] == 2


def test_stop_sequence(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "stop": ["fox"]})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "The quick brown"
    assert choice["finish_reason"] == "stop"


def test_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert_valid("ListModelsResponse", body)
    assert body["data"][0]["id"] == "fake-model"


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={
            **CHAT,
            "max_tokens": 1,
            "frobnicate": {"x": 1},
            "tools": [],
            "user": "u1",
            "metadata": {"team": "a"},
            "seed": 3,
            "top_p": 0.5,
            "presence_penalty": 1,
        },
    )
    assert r.status_code == 200


def test_request_id_reused_and_generated(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers={"x-request-id": "req-123"}
    )
    assert r.headers["x-request-id"] == "req-123"
    r = client.get("/v1/models")
    assert len(r.headers["x-request-id"]) == 32
    r = client.get("/no/such/path", headers={"x-request-id": "req-404"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "req-404"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake-model"}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "messages": "hello"}, "messages"),
        ({**CHAT, "temperature": 2.5}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "presence_penalty": 3}, "presence_penalty"),
        ({**CHAT, "frequency_penalty": -2.1}, "frequency_penalty"),
        ({**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "model": 7}, "model"),
    ],
)
def test_schema_violations_are_400(client: TestClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert_valid("ErrorResponse", err)
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"", b"[1,2]", b"null", b'{"model": "fake-model", "messages": [}']
)
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert_valid("ErrorResponse", r.json())


def test_completions_bad_prompts(client: TestClient) -> None:
    for prompt in [["a", 1], [], None, 3, [[1, 2], "a"], [[]], [True], ["x"] * 65]:
        r = client.post("/v1/completions", json={"model": "fake-model", "prompt": prompt})
        assert r.status_code == 400, (prompt, r.text)
        assert r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "logprobs": 6})
    assert r.status_code == 400


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-7"})
    assert r.status_code == 404
    err = r.json()
    assert_valid("ErrorResponse", err)
    assert err["error"]["code"] == "model_not_found"
    assert err["error"]["param"] == "model"


def test_prompt_too_long_is_400(client: TestClient) -> None:
    long = " ".join(["word"] * 100)
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": long})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": long}], "stream": True},
    )
    assert r.status_code == 400


def test_body_too_large_is_413(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        content=json.dumps({"model": "fake-model", "prompt": "x" * 100_000}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert_valid("ErrorResponse", r.json())


def test_engine_dead_is_503_and_500(client: TestClient, engine: FakeEngine) -> None:
    engine.kill()
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert_valid("ErrorResponse", r.json())
    assert client.get("/ready").status_code == 503


def test_engine_failure_mid_stream_sends_error_event(
    client: TestClient, engine: FakeEngine
) -> None:
    original = engine.generate

    async def failing(request):  # type: ignore[no-untyped-def]
        n = 0
        async for chunk in original(request):
            yield chunk
            n += 1
            if n == 2:
                raise RuntimeError("kaboom")

    engine.generate = failing  # type: ignore[method-assign]
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "stream": True})
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert "error" in evs[-2]
    assert_valid("ErrorResponse", evs[-2])
    r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8})
    assert r.status_code == 500
    body = r.json()
    assert_valid("ErrorResponse", body)
    assert "Traceback" not in r.text


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json() == {"status": "ready"}


def test_engine_start_seconds_is_set_once_ready(client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    (sample,) = families["retort_engine_start_seconds"].samples
    assert 0 < sample.value < 60


def test_openapi_schema_served(client: TestClient) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "/v1/completions" in schema["paths"]


def test_metrics_per_model_and_adapter(client: TestClient, tmp_path: Path) -> None:
    from adapters.synthetic import make_tiny_adapter
    from tests.tiny import make_tiny_base

    base = make_tiny_base(tmp_path / "base")
    make_tiny_adapter(base, tmp_path / "home" / "adapters" / "sql", rank=4, base_name="fake-model")
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, "stream": True})
    # LoRA is on by default: the vLLM-compatible call loads it from the registry.
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "sql"})
    assert r.status_code == 200, r.text
    client.post("/v1/chat/completions", json={**CHAT, "model": "sql", "max_tokens": 4})
    text = client.get("/metrics").text
    assert 'retort_requests_total{adapter="none",model="fake-model",status="ok"} 2.0' in text
    assert 'retort_completion_tokens_total{adapter="none",model="fake-model"} 5.0' in text
    assert 'retort_requests_total{adapter="sql",model="fake-model",status="ok"} 1.0' in text
    assert "retort_time_to_first_token_seconds_bucket" in text
    assert 'retort_inflight_requests{model="fake-model"} 0.0' in text


def test_completions_batch(client: TestClient) -> None:
    body = {"model": "fake-model", "prompt": ["one two", "three"], "n": 2, "max_tokens": 3}
    r = client.post("/v1/completions", json={**body, "echo": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert_valid("CreateCompletionResponse", out)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    single = client.post("/v1/completions", json={**body, "prompt": "three"}).json()
    answers = [c["text"] for c in single["choices"]]  # choice i of any prompt
    assert [c["text"] for c in out["choices"]] == [
        "one two" + answers[0],
        "one two" + answers[1],
        "three" + answers[0],
        "three" + answers[1],
    ]
    assert out["usage"]["completion_tokens"] == 12
    assert out["usage"]["prompt_tokens"] == 3  # 2 + 1 whitespace tokens
    tokens = client.post("/v1/completions", json={**body, "prompt": [[1, 2], [3]]}).json()
    assert len(tokens["choices"]) == 4
    stream = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e for e in events(stream.text) if e != "[DONE]"]
    text: dict[int, str] = {}
    for c in chunks:
        for choice in c["choices"]:
            text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
    assert text == {0: answers[0], 1: answers[1], 2: answers[0], 3: answers[1]}
    assert events(stream.text)[-1] == "[DONE]"


def test_completions_refused_fields(client: TestClient) -> None:
    base = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ]
    for extra, param in cases:
        r = client.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "unsupported_parameter"
    assert client.post("/v1/completions", json={**base, "best_of": 1}).status_code == 200


def test_retrieve_model(client: TestClient) -> None:
    r = client.get("/v1/models/fake-model")
    assert r.status_code == 200
    assert_valid("Model", r.json())
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_engine_without_constraints_refuses_them(client: TestClient) -> None:
    """The fake engine (like a student) cannot constrain its output: a 400 naming the
    field, never a free-text answer that ignores it."""
    fmt = {"type": "json_object"}
    tool = {"type": "function", "function": {"name": "f"}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": fmt}, "response_format"),
        ({"tools": [tool], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [tool]}, "tools"),
        ({"logit_bias": {"3": 10}}, "logit_bias"),
    ]
    for extra, param in cases:
        r = client.post("/v1/chat/completions", json={**CHAT, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert_valid("ErrorResponse", r.json())
        assert r.json()["error"]["param"] == param
