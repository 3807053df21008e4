"""Staged rollouts through the real gateway (the fake engine as the teacher, a real tiny
exported ONNX student): started through the admin API, judged by the evaluator on live
shadow pairs, promoted stage by stage until the student answers everything, or rolled
back with its reason when it disagrees."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.promptlog import PromptLogSettings
from gateway.rollout.policy import RolloutPolicy
from gateway.rollout.service import RolloutSettings
from gateway.settings import EngineSettings, Settings
from gateway.studentpool import StudentsSettings
from loadtest.servers import free_port, gateway_spec, postgres_server, running
from tests.services import service
from tests.tiny import publish_student

pytest.importorskip("onnxruntime_genai")


CHAT = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Hi there"}],
    "max_tokens": 4,
    "temperature": 0,
}
ROLLOUT = "/admin/students/fake-student/rollout"
POLICY = RolloutPolicy(min_pairs=3, min_requests=3, min_stage_s=0.0, min_agreement=0.9)


def app(home: Path, rollout: RolloutSettings) -> Any:
    settings = Settings(
        home=str(home),
        engine=EngineSettings(kind="fake", max_model_len=64),
        promptlog=PromptLogSettings(flush_interval_s=0.02),
        students=StudentsSettings(autoload=False),
        rollout=rollout,
    )
    # The teacher takes 50 ms a token: the tiny student is faster (the latency rule holds).
    return create_app(settings, engine=FakeEngine("fake-model", 64, token_delay_s=0.05))


def drive(client: TestClient[Any], until: Any, timeout_s: float = 90.0) -> dict[str, Any]:
    """Send requests until the rollout's status satisfies ``until``; returns that status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        status = client.get(ROLLOUT).json()
        if until(status):
            return status
    raise AssertionError(f"rollout did not get there in time: {client.get(ROLLOUT).json()}")


def test_a_student_that_agrees_is_promoted_stage_by_stage(tmp_path: Path, tiny_onnx: Path) -> None:
    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    # The untrained student cannot say what the teacher says; judged by ROUGE-L with a
    # threshold of 0, every answer it gives agrees (the mechanics are what is tested here).
    settings = RolloutSettings(
        interval_s=0.05,
        refresh_s=0.05,
        shadow_share=1.0,
        measure="rouge_l",
        min_rouge_l=0.0,
        policy=POLICY,
    )
    with TestClient(app(home, settings)) as client:
        r = client.post(f"{ROLLOUT}/start", json={"reason": "nightly run 7"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rollout"]["teacher"] == "fake-model"  # from the student's manifest
        assert (body["rollout"]["stage"], body["event"]["reason"]) == ("shadow", "nightly run 7")
        assert client.post(f"{ROLLOUT}/start").status_code == 409  # one at a time

        status = drive(client, lambda s: s["rollout"]["status"] == "complete")
        assert status["rollout"]["share"] == 1.0
        events = list(reversed(status["events"]))
        advances = [
            (e["from_stage"], e["to_stage"], e["share"]) for e in events if e["action"] == "advance"
        ]
        assert advances == [
            ("shadow", "canary", 0.05),
            ("canary", "ramp", 0.25),
            ("ramp", "ramp", 0.5),
            ("ramp", "full", 1.0),
        ]
        assert all(e["actor"] == "policy" for e in events[1:])
        for e in events:
            if e["action"] == "advance":
                assert e["figures"]["pairs"] >= 3
                assert e["figures"]["agreement"] == 1.0
                assert e["reason"].startswith("agreement 1.000")
        # The student now answers the teacher's requests; the response names the teacher.
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.json()["model"] == "fake-model"
        assert r.json()["choices"][0]["message"]["content"] != "The quick brown fox"
        listed = client.get("/admin/students/rollouts").json()["data"]
        assert [(x["teacher"], x["stage"]) for x in listed] == [("fake-model", "full")]
        metrics = client.get("/metrics").text
        assert 'retort_rollout_stage{student="fake-student",teacher="fake-model"} 4.0' in metrics
        assert (
            'retort_rollout_split_ratio{student="fake-student",teacher="fake-model"} 1.0' in metrics
        )
        # The operator's way back, from full.
        r = client.post(f"{ROLLOUT}/rollback", json={"reason": "customer complaint"})
        assert r.status_code == 200
        assert (r.json()["rollout"]["share"], r.json()["event"]["actor"]) == (0.0, "operator")
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.json()["choices"][0]["message"]["content"] == "The quick brown fox"


def test_a_student_that_disagrees_is_rolled_back_with_the_reason(
    tmp_path: Path, tiny_onnx: Path
) -> None:
    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    settings = RolloutSettings(
        interval_s=0.05, refresh_s=0.05, shadow_share=1.0, measure="exact", policy=POLICY
    )
    with TestClient(app(home, settings)) as client:
        assert client.post(f"{ROLLOUT}/start").status_code == 200
        status = drive(client, lambda s: s["rollout"]["status"] == "rolled_back")
        last = status["events"][0]
        assert (last["action"], last["actor"], last["rule"]) == ("rollback", "policy", "agreement")
        assert "agreement 0.000 over" in last["reason"]
        assert last["figures"]["pairs"] >= 3
        assert status["rollout"]["reason"] == last["reason"]
        assert client.post(f"{ROLLOUT}/promote").status_code == 409
        # The teacher answers everything again; a new rollout may start.
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.json()["choices"][0]["message"]["content"] == "The quick brown fox"
        assert client.post(f"{ROLLOUT}/start").status_code == 200


def test_admin_errors(tmp_path: Path, tiny_onnx: Path) -> None:
    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    with TestClient(app(home, RolloutSettings())) as client:
        r = client.post("/admin/students/nobody/rollout/start")
        assert (r.status_code, r.json()["error"]["param"]) == (404, "name")
        assert client.get(ROLLOUT).status_code == 404
        assert client.post(f"{ROLLOUT}/pause").status_code == 404
        r = client.post(f"{ROLLOUT}/explode")
        assert (r.status_code, r.json()["error"]["param"]) == (404, "action")
        r = client.post(f"{ROLLOUT}/start", json={"teacher": "fake-model", "bogus": 1})
        assert r.status_code == 400
        r = client.post(f"{ROLLOUT}/start", content=b"{not json")
        assert r.status_code == 400
        r = client.post(f"{ROLLOUT}/start", json={"teacher": "fake-student"})
        assert (r.status_code, r.json()["error"]["param"]) == (404, "teacher")
    off = RolloutSettings(enabled=False)
    with TestClient(app(home, off)) as client:
        r = client.get("/admin/students/rollouts")
        assert (r.status_code, r.json()["error"]["code"]) == (503, "rollouts_disabled")


# -- two gateway processes, one rollout, through Postgres -----------------------------------


SPLIT_OFF = 'retort_rollout_split_ratio{student="fake-student",teacher="fake-model"} 0.0'


def cli(config: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "students",
            "rollout",
            *args,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RETORT_HOME": str(home)},
        timeout=120,
        check=False,
    )


def test_two_gateways_share_one_rollout_through_postgres(tmp_path: Path, tiny_onnx: Path) -> None:
    home = tmp_path / "home"
    publish_student(home, tiny_onnx)
    with service(postgres_server()) as pg:
        config = tmp_path / "retort.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "home": str(home),
                    "engine": {"kind": "fake", "max_model_len": 64, "fake_token_delay_s": 0.05},
                    "model": {"served_name": "fake-model"},
                    "promptlog": {"url": pg.url, "flush_interval_s": 0.02},
                    "rollout": {
                        "interval_s": 0.1,
                        "refresh_s": 0.1,
                        "shadow_share": 1.0,
                        "measure": "rouge_l",
                        "min_rouge_l": 0.0,
                        "policy": {"min_pairs": 3, "min_requests": 3, "min_stage_s": 0},
                    },
                }
            )
        )
        # The operator starts the rollout on the database; no gateway is running yet.
        done = cli(config, home, "start", "fake-student", "--reason", "from the CLI")
        assert done.returncode == 0, done.stderr
        assert "fake-model -> fake-student: start (none -> shadow, share 0)" in done.stdout
        specs = [
            gateway_spec(f"gw{i}", config, free_port(), env={"RETORT_HOME": str(home)})
            for i in (1, 2)
        ]
        with running(specs, tmp_path / "logs", ready_timeout_s=180) as servers:
            clients = [httpx.Client(base_url=s.url, timeout=30) for s in servers]
            try:
                # Both replicas resume the stored rollout and promote it to full together.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    for c in clients:
                        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
                    states = [c.get(ROLLOUT).json()["rollout"] for c in clients]
                    if all(s["status"] == "complete" for s in states):
                        break
                else:
                    raise AssertionError(f"not promoted in time: {states}")
                events = clients[0].get(ROLLOUT).json()["events"]
                actions = [(e["action"], e["to_stage"], e["share"]) for e in reversed(events)]
                # Two evaluators, each decision stored once.
                assert [a for a in actions if a[0] == "advance"] == [
                    ("advance", "canary", 0.05),
                    ("advance", "ramp", 0.25),
                    ("advance", "ramp", 0.5),
                    ("advance", "full", 1.0),
                ]
                assert actions[0] == ("start", "shadow", 0.0)
                # The CLI sees the same rollout and rolls it back; both replicas follow.
                shown = cli(config, home, "status", "fake-student")
                assert shown.returncode == 0, shown.stderr
                assert "fake-model -> fake-student: full (complete), share 1" in shown.stdout
                assert "cost per 1k tokens" in shown.stdout
                back = cli(config, home, "rollback", "fake-student", "--reason", "pager")
                assert back.returncode == 0, back.stderr
                for c in clients:
                    deadline = time.monotonic() + 30
                    while SPLIT_OFF not in c.get("/metrics").text:
                        assert time.monotonic() < deadline, "a replica kept the old split"
                        time.sleep(0.05)
                    r = c.post("/v1/chat/completions", json=CHAT)
                    assert r.json()["choices"][0]["message"]["content"] == "The quick brown fox"
            finally:
                for c in clients:
                    c.close()
