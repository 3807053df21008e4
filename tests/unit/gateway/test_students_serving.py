"""Students served by the gateway: listed, selected by ``model``, loaded at start or hot
through the admin API, streamed, metered, logged as ``served_by: student``, and given a
share of a teacher's traffic. A real (tiny, untrained) exported ONNX student."""

from __future__ import annotations

import asyncio
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
from gateway.students import StudentRegistry
from retort.db.store import PromptStore
from tests.openai_schema import assert_valid

pytest.importorskip("onnxruntime_genai")

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def publish(home: Path, onnx_dir: Path, name: str = "fake-student") -> None:
    StudentRegistry(home / "students").publish(
        name, onnx_dir, teacher_model="fake-model", precision="fp32", report={"agreement": 1.0}
    )


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
def client(home: Path, onnx_dir: Path) -> Iterator[TestClient[Any]]:
    publish(home, onnx_dir)
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
            return await store.query(served_by="student")

    rows = asyncio.run(read())
    assert [r["model"] for r in rows] == ["fake-student", "fake-student"]


def test_student_rejects_logprobs_clearly(client: TestClient[Any]) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "fake-student", **CHAT, "logprobs": True, "max_tokens": 2},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logprobs"


def test_hot_load_and_unload_through_the_admin_api(home: Path, onnx_dir: Path) -> None:
    with TestClient(make_app(home, autoload=False)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake-model"]
        publish(home, onnx_dir, "late-student")  # published while the gateway runs
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


def test_registered_student_loads_on_first_request(home: Path, onnx_dir: Path) -> None:
    publish(home, onnx_dir)
    with TestClient(make_app(home, autoload=False)) as c:
        r = c.post("/v1/chat/completions", json={"model": "fake-student", **CHAT, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.get("/admin/students").json()["loaded"] == ["fake-student"]


def test_traffic_share_goes_to_the_student(home: Path, onnx_dir: Path) -> None:
    publish(home, onnx_dir)
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
