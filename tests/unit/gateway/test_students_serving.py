"""Students served by the gateway: listed, selected by ``model``, loaded at start or hot
through the admin API, streamed, metered, logged as ``served_by: student``, and given a
share of a teacher's traffic. A real (tiny, untrained) exported ONNX student."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.settings import EngineSettings, Settings
from gateway.studentpool import StudentsSettings, TrafficSplit
from retort.db.filters import RowFilter
from retort.db.store import PromptStore
from tests import waits
from tests.openai_schema import assert_valid
from tests.tiny import publish_student

pytest.importorskip("onnxruntime_genai")

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def make_app(home: Path, **students: Any) -> Any:
    settings = Settings(
        home=str(home),
        engine=EngineSettings(kind="fake", max_model_len=64),
        promptlog=PromptLogSettings(flush_interval_s=0.05),
        students=StudentsSettings(**students),
    )
    return create_app(settings, engine=FakeEngine("fake-model", 64))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def client(home: Path, tiny_onnx: Path) -> Iterator[TestClient[Any]]:
    publish_student(home, tiny_onnx)
    with TestClient(make_app(home)) as c:
        yield c


def test_student_is_listed_and_served(client: TestClient[Any], home: Path) -> None:
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["fake-model", "fake-student"]
    assert_valid("ListModelsResponse", models)

    r = client.post(
        "/v1/chat/completions",
        json={"model": "fake-student", **CHAT, "max_tokens": 6, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert body["model"] == "fake-student"
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["finish_reason"] == "length"

    s = client.post(
        "/v1/completions",
        json={"model": "fake-student", "prompt": "Once upon", "max_tokens": 5, "stream": True},
    )
    assert s.status_code == 200
    events = [line for line in s.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3

    metrics = client.get("/metrics").text
    assert 'retort_requests_total{adapter="none",model="fake-student",status="ok"} 2.0' in metrics

    client.__exit__(None, None, None)

    async def read() -> list[dict[str, Any]]:
        async with PromptStore(f"sqlite+aiosqlite:///{home}/retort.db") as store:
            return await store.query(RowFilter(served_by="student"))

    rows = asyncio.run(read())
    assert [r["model"] for r in rows] == ["fake-student", "fake-student"]


@pytest.mark.parametrize("stream", [False, True])
def test_student_returns_logprobs(client: TestClient[Any], stream: bool) -> None:
    # Greedy: a sampled random model may draw four tokens that spell nothing (the end of
    # text, which ignore_eos lets through, or bytes that end inside a UTF-8 character).
    body = {
        "model": "fake-student",
        **CHAT,
        "max_tokens": 4,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        entries = [
            e
            for ev in events
            for c in ev["choices"]
            for e in (c.get("logprobs") or {}).get("content") or []
        ]
        text = "".join(c["delta"].get("content") or "" for ev in events for c in ev["choices"])
    else:
        assert_valid("CreateChatCompletionResponse", r.json())
        choice = r.json()["choices"][0]
        entries, text = choice["logprobs"]["content"], choice["message"]["content"]
    assert len(entries) == 4
    # (The tokens' own texts need not add up to the text here: a random model's byte-level
    # tokens often end inside a UTF-8 character.)
    assert text
    for e in entries:
        assert e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 3
        ranked = [t["logprob"] for t in e["top_logprobs"]]
        assert ranked == sorted(ranked, reverse=True)
        assert ranked[0] >= e["logprob"] - 1e-6  # the first is the likeliest


def test_hot_load_and_unload_through_the_admin_api(home: Path, tiny_onnx: Path) -> None:
    with TestClient(make_app(home, autoload=False)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model"]
        publish_student(home, tiny_onnx, "late-student")  # published while the gateway runs
        listing = c.get("/admin/students").json()
        assert listing["loaded"] == []
        assert [s["name"] for s in listing["registered"]] == ["late-student"]
        r = c.post("/admin/students", json={"name": "late-student"})
        assert r.status_code == 200, r.text
        assert r.json()["loaded"] is True
        assert "late-student" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        ok = c.post("/v1/chat/completions", json={"model": "late-student", **CHAT, "max_tokens": 2})
        assert ok.status_code == 200
        assert c.delete("/admin/students/late-student").status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model"]
        assert c.delete("/admin/students/late-student").status_code == 404
        assert c.post("/admin/students", json={"name": "nope"}).status_code == 404
        assert c.post("/admin/students", json={"name": "fake-model"}).status_code == 409
        assert c.post("/admin/students", json={"name": "../x"}).status_code in (400, 404)
        assert c.post("/admin/students", json={}).status_code == 400


def test_registered_student_loads_on_first_request(home: Path, tiny_onnx: Path) -> None:
    publish_student(home, tiny_onnx)
    with TestClient(make_app(home, autoload=False)) as c:
        r = c.post("/v1/chat/completions", json={"model": "fake-student", **CHAT, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.get("/admin/students").json()["loaded"] == ["fake-student"]


def test_traffic_share_goes_to_the_student(home: Path, tiny_onnx: Path) -> None:
    publish_student(home, tiny_onnx)
    app = make_app(home, traffic={"fake-model": TrafficSplit(student="fake-student", share=0.5)})
    with TestClient(app) as c:
        for _ in range(40):
            body = {"model": "fake-model", **CHAT, "max_tokens": 1}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            assert r.json()["model"] == "fake-model"
        text = c.get("/metrics").text
    student = _count(text, "fake-student")
    teacher = _count(text, "fake-model")
    assert student + teacher == 40
    assert 8 <= student <= 32  # share 0.5 of 40 (p < 1e-4 outside)


def test_bad_traffic_share_is_a_config_error(home: Path) -> None:
    with pytest.raises(ValueError, match="share"):
        make_app(home, traffic={"m": TrafficSplit(student="s", share=1.5)})


def _count(metrics: str, model: str) -> int:
    prefix = f'retort_requests_total{{adapter="none",model="{model}",status="ok"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return int(float(line[len(prefix) :]))
    return 0


LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative"]}},
    "required": ["label"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_student_decodes_json_to_the_schema(client: TestClient[Any], stream: bool) -> None:
    """An untrained student still answers with JSON that matches the schema: the grammar,
    not the weights, decides which tokens it may choose."""
    body = {
        "model": "fake-student",
        **CHAT,
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": 5,
        "stream": stream,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True},
        },
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [
            json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
        ]
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
    else:
        choice = r.json()["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
    assert finish == "stop"
    assert json.loads(text)["label"] in ("positive", "negative")


def test_student_refuses_a_schema_it_cannot_compile(client: TestClient[Any]) -> None:
    body = {
        "model": "fake-student",
        **CHAT,
        "max_tokens": 4,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
            },
        },
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"


def test_student_applies_logit_bias(client: TestClient[Any]) -> None:
    body = {"model": "fake-student", **CHAT, "max_tokens": 5, "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()
    forced = client.post("/v1/chat/completions", json={**body, "logit_bias": {"300": 100}}).json()
    text = forced["choices"][0]["message"]["content"]
    assert text != plain["choices"][0]["message"]["content"]
    assert text
    assert text == text[: len(text) // 5] * 5  # the one boosted token, five times
    bad = client.post("/v1/chat/completions", json={**body, "logit_bias": {"99999": 5}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "logit_bias"


def test_student_calls_a_named_tool(client: TestClient[Any]) -> None:
    """Tools reach the student's prompt (a Hermes system prompt: its template takes no
    tools), and a named function is decoded against its parameters."""
    params = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "weather", "parameters": params}}
    base = {"model": "fake-student", **CHAT, "max_tokens": 30, "seed": 1}
    r = client.post(
        "/v1/chat/completions",
        json={
            **base,
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid("CreateChatCompletionResponse", body)
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    plain = client.post("/v1/chat/completions", json={**base, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20


def test_a_republished_student_is_served_from_its_new_files(
    home: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """The scheduled distillation republishes under the same name: the running gateway
    notices, loads the new files beside the old engine and switches to them; the old
    engine closes once its requests are done; new files that do not load change nothing."""
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    other = build_onnx(
        make_tiny_base(tmp_path / "other", seed=11, hidden_size=64, context=2048),
        tmp_path / "other-onnx",
        "fp32",
    )
    publish_student(home, tiny_onnx, "bot-student")
    body = {"model": "bot-student", **CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True}

    def answer(c: TestClient[Any]) -> list[float]:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]

    with TestClient(make_app(home, reload_interval_s=0.1)) as c:
        pool = c.app.state.gateway.router.students
        first = pool.get("bot-student")
        before = answer(c)
        publish_student(home, other, "bot-student")

        wait = c.blocking_portal.call
        wait(lambda: waits.until(lambda: pool.get("bot-student") is not first, 30, 0.05))
        after = answer(c)
        assert after != before  # the other model's distribution
        wait(lambda: waits.until(lambda: not first.ready(), 30, 0.05))  # the old one closed

        # A publish whose files are then damaged: the gateway keeps the engine it has.
        second = pool.get("bot-student")
        publish_student(home, tiny_onnx, "bot-student")
        data = next((home / "students" / "bot-student" / "onnx").glob("*.onnx.data"), None)
        target = data or home / "students" / "bot-student" / "onnx" / "model.onnx"
        target.write_bytes(target.read_bytes()[:100])
        assert c.blocking_portal.call(pool.refresh) == []
        assert pool.get("bot-student") is second
        assert answer(c) == after
