"""Rollouts in the database (SQLite and Postgres): stored state, one decision per version,
and the evaluator promoting a good student stage by stage and rolling a bad one back, on
rows of the prompt log and the shadow table."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics
from gateway.rollout.policy import RolloutPolicy
from gateway.rollout.service import RolloutService, RolloutSettings, find, operate
from retort import rollout as m
from retort.db.filters import RowFilter
from retort.db.rollouts import RolloutStore, start_rollout
from retort.db.store import PromptStore
from retort.rollout import RolloutError
from tests.unit.gateway.promptlog.conftest import make_record

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEACHER, STUDENT = "base-model", "base-student"
POLICY = RolloutPolicy(min_pairs=5, min_requests=5, min_feedback=3, min_stage_s=0.0)
_n = iter(range(10**6))


async def feed(
    store: PromptStore,
    t: float,
    *,
    pairs: int = 0,
    agree: bool = True,
    teacher: int = 0,
    student: int = 0,
    student_latency: float = 0.05,
    student_status: str = "ok",
) -> None:
    """Rows created at ``t``: teacher answers, the student's live answers, shadow pairs."""
    records = [make_record(next(_n), created=t, latency_s=0.5) for _ in range(teacher)]
    records += [
        make_record(
            next(_n),
            created=t,
            model=STUDENT,  # a split request's record names the engine that answered
            served_by="student",
            latency_s=student_latency,
            status=student_status,
        )
        for _ in range(student)
    ]
    await store.insert_many(records)
    rows: list[dict[str, Any]] = [
        {
            "request_id": f"pair-{next(_n)}",
            "created": t,
            "teacher": TEACHER,
            "student": STUDENT,
            "measure": "exact",
            "score": 1.0 if agree else 0.0,
            "agree": agree,
            "outcome": "agree" if agree else "disagree",
            "teacher_text": "yes",
            "student_text": "yes" if agree else "no",
            "teacher_latency_s": 0.5,
            "student_latency_s": student_latency,
            "teacher_cost_usd": 1e-3,
            "student_cost_usd": 1e-4,
            "student_tokens": 4,
            "error": None,
        }
        for _ in range(pairs)
    ]
    await store.insert_shadow(rows)


def service(store: PromptStore, metrics: Metrics | None = None) -> RolloutService:
    return RolloutService(
        RolloutSettings(policy=POLICY), RolloutStore(store.engine), metrics=metrics
    )


async def test_state_and_events_round_trip(store: PromptStore) -> None:
    rs = RolloutStore(store.engine)
    r, event = m.start(TEACHER, STUDENT, now=10.0)
    stored = await rs.create(r, event)
    assert stored.id is not None
    assert stored.version == 0
    assert await rs.latest(TEACHER) == stored
    assert (await rs.current()) == {TEACHER: stored}
    with pytest.raises(RolloutError, match="already has a active rollout"):
        await rs.create(*m.start(TEACHER, "other", now=11.0))
    after, event = m.advance(stored, reason="good", rule="passed", figures={"pairs": 5}, now=20.0)
    moved = await rs.apply(after, event)
    assert moved is not None
    assert (moved.version, moved.stage, moved.share) == (1, "canary", 0.05)
    # A decision taken on the old version is dropped: it is stored once.
    assert await rs.apply(after, event) is None
    assert (await rs.latest(TEACHER)) == moved
    events = await rs.events(rollout_id=stored.id)
    assert [e["action"] for e in events] == ["advance", "start"]
    assert events[0]["figures"] == {"pairs": 5}
    assert (events[0]["from_stage"], events[0]["to_stage"], events[0]["share"]) == (
        "shadow",
        "canary",
        0.05,
    )
    # A finished rollout makes room for the next one; the latest decides the split.
    back = await rs.apply(*m.rollback(moved, reason="bad"))
    assert back is not None
    second = await rs.create(*m.start(TEACHER, "other", now=30.0))
    assert (await rs.current())[TEACHER].id == second.id


async def test_a_good_student_is_promoted_stage_by_stage(store: PromptStore) -> None:
    metrics = Metrics(CollectorRegistry())
    svc = service(store, metrics)
    r, _ = await svc.operate("start", TEACHER, student=STUDENT)
    t0 = r.stage_since
    # Shadow: too few pairs yet -> a hold, stored once (not at every evaluation).
    await feed(store, t0 + 1, pairs=3, teacher=3)
    for _ in range(2):
        ((_, d),) = await svc.evaluate(now=t0 + 2)
        assert (d.action, d.rule) == ("hold", "agreement")
    stages = ["shadow"]
    t = t0 + 2
    for _ in range(4):
        await feed(store, t + 1, pairs=6, teacher=6, student=6 if stages[-1] != "shadow" else 0)
        ((_, d),) = await svc.evaluate(now=t + 2)
        assert d.action == "advance", d.reason
        t += 3
        stages.append(svc.current[TEACHER].stage)
    assert stages == ["shadow", "canary", "ramp", "ramp", "full"]
    final = svc.current[TEACHER]
    assert (final.status, final.share, svc.split(TEACHER)) == ("complete", 1.0, (STUDENT, 1.0))
    assert svc.shadow_target(TEACHER) is None  # nothing left to compare
    assert await svc.evaluate(now=t + 10) == []  # a finished rollout is not judged
    events = await svc.store.events(rollout_id=final.id)
    assert [e["action"] for e in reversed(events)] == [
        "start",
        "hold",
        "advance",
        "advance",
        "advance",
        "advance",
    ]
    assert all(e["actor"] == "policy" for e in events[:-1])
    assert events[0]["figures"]["pairs"] == 6
    assert events[0]["figures"]["agreement"] == 1.0
    text = metrics.render().decode()
    assert f'retort_rollout_stage{{student="{STUDENT}",teacher="{TEACHER}"}} 4.0' in text
    assert f'retort_rollout_split_ratio{{student="{STUDENT}",teacher="{TEACHER}"}} 1.0' in text
    assert 'retort_rollout_decisions_total{action="advance"' in text


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        ({"agree": False}, "agreement"),
        ({"student_latency": 2.0}, "latency"),
        ({"student_status": "error"}, "errors"),
    ],
)
async def test_a_bad_student_is_rolled_back_with_the_reason(
    store: PromptStore, bad: dict[str, Any], rule: str
) -> None:
    svc = service(store)
    r, _ = await svc.operate("start", TEACHER, student=STUDENT)
    r, _ = await svc.operate("promote", TEACHER)  # canary: the student answers live too
    await feed(store, r.stage_since + 1, pairs=6, teacher=6, student=6, **bad)
    ((_, d),) = await svc.evaluate(now=r.stage_since + 2)
    assert (d.action, d.rule) == ("rollback", rule)
    back = svc.current[TEACHER]
    assert (back.status, back.share, svc.split(TEACHER)) == ("rolled_back", 0.0, None)
    (last, *_) = await svc.store.events(rollout_id=back.id)
    assert (last["action"], last["actor"], last["rule"], last["from_stage"]) == (
        "rollback",
        "policy",
        rule,
        "canary",
    )
    assert last["reason"] == d.reason
    assert last["figures"]["student_answers"] == 12


async def test_a_bad_feedback_score_rolls_back(store: PromptStore) -> None:
    svc = service(store)
    r, _ = await svc.operate("start", TEACHER, student=STUDENT)
    r, _ = await svc.operate("promote", TEACHER)
    t = r.stage_since + 1
    await feed(store, t, pairs=6, teacher=6, student=6)
    for row in await store.query(RowFilter(since=t, until=t + 1)):
        score = 0.0 if row["served_by"] == "student" else 1.0
        assert await store.add_feedback(row["request_id"], score)
    ((_, d),) = await svc.evaluate(now=t + 1)
    assert (d.action, d.rule) == ("rollback", "feedback")


async def test_two_replicas_store_one_decision(store: PromptStore) -> None:
    a, b = service(store), service(store)
    r, _ = await a.operate("start", TEACHER, student=STUDENT)
    await feed(store, r.stage_since + 1, pairs=6, teacher=6)
    await b.refresh()
    assert b.current[TEACHER].stage == "shadow"
    ((_, da),) = await a.evaluate(now=r.stage_since + 2)
    # b read the state before a's decision landed: its own decision is dropped.
    b_stale = b.current[TEACHER]
    db = await b._evaluate(b_stale, r.stage_since + 2)
    assert da.action == db.action == "advance"
    events = await a.store.events(rollout_id=r.id)
    assert [e["action"] for e in events] == ["advance", "start"]
    await b.refresh()
    assert b.split(TEACHER) == (STUDENT, 0.05)  # both replicas now apply the same split


async def test_operator_actions(store: PromptStore) -> None:
    svc = service(store)
    rs = svc.store
    with pytest.raises(LookupError):
        await operate(rs, "pause", TEACHER)
    await svc.operate("start", TEACHER, student=STUDENT)
    assert (await find(rs, STUDENT)).teacher == TEACHER
    with pytest.raises(LookupError):
        await find(rs, STUDENT, "another-teacher")
    r, event = await svc.operate("pause", TEACHER, reason="on call is busy")
    assert (r.status, event.reason, event.actor) == ("paused", "on call is busy", "operator")
    # A paused rollout is not advanced by the policy, even when it could be.
    await feed(store, r.stage_since + 1, pairs=6, teacher=6)
    ((_, d),) = await svc.evaluate(now=r.stage_since + 2)
    assert (d.action, d.rule) == ("hold", "paused")
    assert "would advance" in d.reason
    # `start` of the same student resumes it.
    r, event = await svc.operate("start", TEACHER, student=STUDENT)
    assert (r.status, event.action) == ("active", "resume")
    with pytest.raises(RolloutError, match="not `other`"):
        await svc.operate("promote", TEACHER, student="other")
    r, _ = await svc.operate("rollback", TEACHER)
    with pytest.raises(RolloutError, match="already rolled back"):
        await svc.operate("rollback", TEACHER)
    with pytest.raises(RolloutError, match="unknown rollout action"):
        await operate(rs, "explode", TEACHER)


async def test_stage_data_picks_each_sides_answers(store: PromptStore) -> None:
    t = 1000.0
    await store.insert_many(
        [
            make_record(1, created=t),  # the base model, answered by itself
            make_record(2, created=t, adapter="pirate"),  # an adapter on the base model
            make_record(3, created=t, model=STUDENT, served_by="student"),
            make_record(4, created=t, model="other-student", served_by="student"),
            make_record(5, created=t - 1),  # before the stage began
        ]
    )
    rs = RolloutStore(store.engine)
    base = await rs.stage_data(TEACHER, STUDENT, t)
    assert (len(base.teacher), len(base.student)) == (1, 1)
    adapter = await rs.stage_data("pirate", STUDENT, t)
    assert (len(adapter.teacher), len(adapter.student)) == (1, 1)
    assert (await rs.stage_data("pirate", "nobody", t)).student == []


async def test_distill_starts_a_rollout_and_supersedes_a_live_one(
    store: PromptStore, store_url: str
) -> None:
    first = await start_rollout(store_url, TEACHER, STUDENT, [0.1], reason="run 1")
    assert (first.stage, first.plan) == ("shadow", [0.0, 0.1, 1.0])
    second = await start_rollout(store_url, TEACHER, STUDENT, [0.1], reason="run 2")
    assert second.id != first.id
    rs = RolloutStore(store.engine)
    (old,) = [e for e in await rs.events(rollout_id=first.id) if e["action"] == "rollback"]
    assert (old["actor"], old["reason"]) == (
        "distill",
        f"superseded by a newly published `{STUDENT}`",
    )
    (started,) = await rs.events(rollout_id=second.id)
    assert (started["action"], started["actor"], started["reason"]) == ("start", "distill", "run 2")
