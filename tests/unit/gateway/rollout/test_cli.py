"""``retort students rollout`` on a SQLite prompt log (the replicas test drives it on
Postgres, with a published student), and ``retort distill run --rollout``'s guard."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from distill.cli import distill_app
from gateway.rollout.cli import students_app
from gateway.rollout.service import operate
from retort.db.rollouts import RolloutStore
from retort.db.store import PromptStore

runner = CliRunner()


def _start(url: str) -> None:
    async def go() -> None:
        async with PromptStore(url) as store:
            await operate(RolloutStore(store.engine), "start", "pirate", student="pirate-student")

    asyncio.run(go())


def test_status_pause_promote_rollback(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'retort.db'}"
    res = runner.invoke(students_app, ["rollout", "status", "--url", url])
    assert (res.exit_code, res.output.strip()) == (0, "no rollouts")
    _start(url)
    res = runner.invoke(students_app, ["rollout", "status", "--url", url])
    assert "pirate -> pirate-student: shadow (active), share 0" in res.output
    res = runner.invoke(students_app, ["rollout", "pause", "pirate-student", "--url", url])
    assert res.exit_code == 0, res.output
    assert "pirate -> pirate-student: pause (shadow -> shadow, share 0)" in res.output
    res = runner.invoke(students_app, ["rollout", "promote", "pirate-student", "--url", url])
    assert "promote" not in res.output  # the event is an advance, by the operator
    assert "advance (shadow -> canary, share 0.05)" in res.output
    res = runner.invoke(students_app, ["rollout", "status", "pirate-student", "--url", url])
    assert res.exit_code == 0, res.output
    assert "pirate -> pirate-student: canary (paused), share 0.05" in res.output
    assert "policy now: hold (waiting for shadow pairs: 0 of 50)" in res.output
    assert "advance  by operator shadow -> canary" in res.output
    args = ["rollout", "rollback", "pirate-student", "--reason", "pager", "--url", url]
    res = runner.invoke(students_app, args)
    assert "rollback (canary -> rolled_back, share 0)" in res.output
    res = runner.invoke(
        students_app, ["rollout", "status", "pirate-student", "--json", "--url", url]
    )
    body = json.loads(res.output)
    assert body["rollout"]["status"] == "rolled_back"
    assert body["events"][0]["reason"] == "pager"
    assert body["next"] is None
    # Errors name what is wrong and exit non-zero.
    res = runner.invoke(students_app, ["rollout", "rollback", "pirate-student", "--url", url])
    assert res.exit_code == 1
    assert "already rolled back" in res.output
    res = runner.invoke(students_app, ["rollout", "pause", "nobody", "--url", url])
    assert (res.exit_code, "`nobody` has no rollout" in res.output) == (1, True)
    res = runner.invoke(students_app, ["rollout", "start", "nobody", "--url", url])
    assert res.exit_code == 1
    assert "no student 'nobody'" in res.output


def test_distill_rollout_needs_publish(tmp_path: Path) -> None:
    res = runner.invoke(distill_app, ["run", "--out", str(tmp_path / "run"), "--rollout"])
    assert res.exit_code == 2
    assert "--rollout needs --publish" in res.output


def test_distill_starts_the_published_students_rollout_with_the_configured_plan(
    tmp_path: Path,
) -> None:
    from distill.cli import start_rollout_for
    from distill.config import load_config
    from distill.results import Summary

    url = f"sqlite+aiosqlite:///{tmp_path / 'retort.db'}"
    gateway_yaml = tmp_path / "retort.yaml"
    gateway_yaml.write_text("rollout:\n  policy:\n    steps: [0.1, 0.3]\n")
    cfg = load_config(None, {"promptlog_url": url, "settings": str(gateway_yaml)})
    report = Summary(adapter="pirate", teacher_model="base", student_model="pirate-student")
    said = start_rollout_for(cfg, report, tmp_path / "run")
    assert said == "rollout started: pirate -> pirate-student in shadow"
    res = runner.invoke(
        students_app, ["rollout", "status", "pirate-student", "--json", "--url", url]
    )
    body = json.loads(res.output)
    assert body["rollout"]["plan"] == [0.0, 0.1, 0.3, 1.0]
    (event,) = body["events"]
    assert (event["actor"], event["reason"]) == (
        "distill",
        f"published by retort distill run --out {tmp_path / 'run'}",
    )
