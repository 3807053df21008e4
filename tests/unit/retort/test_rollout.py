"""The rollout state machine: shadow -> canary -> ramp -> full, pause/resume, rollback."""

from __future__ import annotations

import pytest

from retort import rollout as m
from retort.rollout import Rollout, RolloutError


def started(**kw: object) -> Rollout:
    r, _ = m.start("pirate", "pirate-student", now=100.0, **kw)  # type: ignore[arg-type]
    return r


def test_start_is_shadow_with_no_share() -> None:
    r, event = m.start("pirate", "pirate-student", now=100.0)
    assert (r.status, r.stage, r.step, r.share) == ("active", "shadow", 0, 0.0)
    assert r.plan == [0.0, 0.05, 0.25, 0.5, 1.0]
    assert r.shadowing
    assert (event.action, event.actor, event.from_stage, event.to_stage) == (
        "start",
        "operator",
        "none",
        "shadow",
    )


def test_advance_walks_every_stage_to_full() -> None:
    r = started()
    seen = [(r.stage, r.share)]
    for i in range(4):
        r, event = m.advance(r, reason=f"step {i}", rule="passed", figures={"pairs": 50}, now=200.0)
        seen.append((r.stage, r.share))
        assert event.action == "advance"
        assert event.figures == {"pairs": 50}
        assert r.stage_since == 200.0
    assert seen == [
        ("shadow", 0.0),
        ("canary", 0.05),
        ("ramp", 0.25),
        ("ramp", 0.5),
        ("full", 1.0),
    ]
    assert r.status == "complete"
    assert not r.shadowing
    with pytest.raises(RolloutError, match="complete"):
        m.advance(r)


def test_rollback_from_any_live_stage_and_from_full() -> None:
    r = started()
    for _ in range(4):
        back, event = m.rollback(r, reason="agreement 0.1", rule="agreement")
        assert (back.status, back.stage, back.share) == ("rolled_back", "rolled_back", 0.0)
        assert (event.from_stage, event.to_stage, event.rule) == (
            r.stage,
            "rolled_back",
            "agreement",
        )
        r, _ = m.advance(r)
    assert r.status == "complete"
    back, _ = m.rollback(r, actor="operator")
    assert back.share == 0.0
    with pytest.raises(RolloutError, match="already rolled back"):
        m.rollback(back)
    with pytest.raises(RolloutError, match="rolled_back"):
        m.advance(back, actor="operator")


def test_pause_keeps_the_split_and_stops_the_policy() -> None:
    r, _ = m.advance(started())
    paused, event = m.pause(r)
    assert (paused.status, paused.share, event.action) == ("paused", 0.05, "pause")
    with pytest.raises(RolloutError, match="policy waits"):
        m.advance(paused)
    promoted, _ = m.advance(paused, actor="operator")  # the operator still may
    assert (promoted.status, promoted.share) == ("paused", 0.25)
    with pytest.raises(RolloutError, match="already paused"):
        m.pause(paused)
    resumed, event = m.resume(paused, now=500.0)
    assert (resumed.status, resumed.stage_since, event.action) == ("active", 500.0, "resume")
    with pytest.raises(RolloutError, match="not paused"):
        m.resume(resumed)
    back, _ = m.rollback(paused)  # the policy still rolls a paused rollout back
    assert back.status == "rolled_back"


def test_one_live_rollout_per_teacher() -> None:
    r = started()
    with pytest.raises(RolloutError, match="already has a active rollout"):
        m.start("pirate", "other-student", current=r)
    done, _ = m.rollback(r)
    again, _ = m.start("pirate", "other-student", current=done)
    assert again.student == "other-student"
    with pytest.raises(RolloutError, match="replace itself"):
        m.start("pirate", "pirate")


@pytest.mark.parametrize("steps", [[0.5, 0.25], [0.0, 0.5], [0.5, 1.0], [0.3, 0.3]])
def test_plans_must_increase_within_zero_and_one(steps: list[float]) -> None:
    with pytest.raises(RolloutError, match="increase strictly"):
        m.make_plan(steps)


def test_steps_from_a_config_section() -> None:
    assert m.steps_from({}) == [0.05, 0.25, 0.5]
    assert m.steps_from({"policy": {"steps": [0.1, 0.5]}}) == [0.1, 0.5]
    custom = started(steps=[0.1])
    assert [custom.stage, m.advance(custom)[0].stage] == ["shadow", "canary"]
    assert m.advance(m.advance(custom)[0])[0].stage == "full"


def test_hold_keeps_the_stage_and_notes_the_rule() -> None:
    r = started()
    held, event = m.hold(r, reason="waiting for shadow pairs: 3 of 50", rule="agreement")
    assert (held.step, held.status, held.last_rule) == (0, "active", "agreement")
    assert (event.action, event.actor, event.from_stage, event.to_stage) == (
        "hold",
        "policy",
        "shadow",
        "shadow",
    )
