"""Shadow evaluation through the gateway: live requests to the teacher are re-answered by a
real (tiny, exported) ONNX student in the background; the user gets the teacher's answer,
the pairs land in the database and the metrics, and the admin API summarizes them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.rollout.service import RolloutSettings
from gateway.settings import EngineSettings, Settings
from gateway.shadow import ShadowSettings, ShadowTarget
from gateway.studentpool import StudentsSettings
from tests.tiny import publish_student

pytest.importorskip("onnxruntime_genai")

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi there"}]}


def wait_for(cond: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_shadow_pairs_through_the_gateway(tmp_path: Path, tiny_onnx: Path) -> None:
    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    settings = Settings(
        home=str(home),
        engine=EngineSettings(kind="fake", max_model_len=64),
        promptlog=PromptLogSettings(flush_interval_s=0.05),
        students=StudentsSettings(autoload=True),
        shadow=ShadowSettings(
            teachers={"fake-model": ShadowTarget(student="fake-student", share=1.0)}
        ),
    )
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as client:
        for _ in range(3):
            r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert r.status_code == 200
            # The user always gets the teacher's answer.
            assert r.json()["choices"][0]["message"]["content"] == "The quick brown fox"
        # A request the teacher refused is never shadowed (the fake engine takes no
        # logit_bias, which a split or shadow copy keeps on the teacher anyway)...
        r = client.post(
            "/v1/chat/completions", json={**CHAT, "logit_bias": {"5": 1}, "max_tokens": 2}
        )
        assert r.status_code == 400

        def summary() -> Any:
            body = client.get("/admin/students/fake-student/shadow").json()
            return body if body["summary"]["pairs"] >= 3 else None

        body = wait_for(summary)
        s = body["summary"]
        assert s["pairs"] == 3  # ...so three pairs, not four
        assert s["compared"] == 3
        assert s["errors"] == 0
        assert 0.0 <= s["agreement"] <= 1.0
        assert s["student_p95_latency_s"] > 0
        pair = body["pairs"][0]
        assert pair["teacher"] == "fake-model"
        assert pair["teacher_text"] == "The quick brown fox"
        assert pair["measure"] == "exact"
        metrics = client.get("/metrics").text
        shadowed = sum(
            sample.value
            for family in text_string_to_metric_families(metrics)
            if family.name == "retort_shadow_requests"
            for sample in family.samples
            if sample.name == "retort_shadow_requests_total"
            and sample.labels["teacher"] == "fake-model"
            and sample.labels["outcome"] in ("agree", "disagree")
        )
        assert shadowed == 3
        assert "retort_shadow_agreement_ratio{" in metrics


def test_shadow_admin_is_503_when_off(tmp_path: Path) -> None:
    # Off: no shadow.teachers, and no rollouts (whose live ones shadow their students).
    settings = Settings(
        home=str(tmp_path),
        engine=EngineSettings(kind="fake", max_model_len=64),
        rollout=RolloutSettings(enabled=False),
    )
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as client:
        r = client.get("/admin/students/x/shadow")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "shadow_disabled"


@pytest.mark.parametrize("stream", [False, True])
def test_a_shadow_starts_only_after_the_users_response_is_sent(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """Over a real socket (uvicorn): the last byte of the user's response (or stream) is
    handed to the server before the shadow copy starts, every time."""
    import httpx

    from gateway.shadow import ShadowRunner
    from loadtest.servers import serving_app

    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    order: list[str] = []
    run = ShadowRunner._run

    async def recorded(self: ShadowRunner, *args: Any) -> None:
        order.append("shadow")
        await run(self, *args)

    monkeypatch.setattr(ShadowRunner, "_run", recorded)
    settings = Settings(
        home=str(home),
        engine=EngineSettings(kind="fake", max_model_len=64),
        promptlog=PromptLogSettings(flush_interval_s=0.05),
        students=StudentsSettings(autoload=True),
        shadow=ShadowSettings(
            teachers={"fake-model": ShadowTarget(student="fake-student", share=1.0)}
        ),
    )
    inner = create_app(settings, engine=FakeEngine("fake-model", 64))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def sent(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                order.append("sent")

        await inner(scope, receive, sent if scope["type"] == "http" else send)

    with serving_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:

        def pairs() -> int:
            body = client.get("/admin/students/fake-student/shadow").json()
            return int(body["summary"]["pairs"])

        for n in range(1, 6):
            order.clear()
            r = client.post(
                "/v1/chat/completions", json={**CHAT, "max_tokens": 4, "stream": stream}
            )
            assert r.status_code == 200
            wait_for(lambda: len(order) >= 2)
            assert order == ["sent", "shadow"]
            # Let this shadow finish before the next request: past ``max_inflight`` (4)
            # running shadows a new one is dropped by design, and five requests in a row
            # can outpace a busy machine's student.
            wait_for(lambda n=n: pairs() >= n)
