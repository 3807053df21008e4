"""The rollout policy as a pure function over figures: each rule, each way back, and
``figures_from`` over stored rows."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from gateway.rollout.policy import Figures, RolloutPolicy, decide, figures_from, p95
from retort.db.rollouts import StageData

POLICY = RolloutPolicy(
    min_pairs=50,
    min_agreement=0.9,
    min_requests=20,
    max_latency_ratio=1.0,
    min_feedback=10,
    min_stage_s=60.0,
)

GOOD = Figures(
    pairs=60,
    agreement=0.95,
    student_answers=60,
    student_errors=0,
    teacher_answers=100,
    teacher_errors=1,
    student_p95_s=0.2,
    teacher_p95_s=0.8,
    student_rated=12,
    student_score=0.9,
    teacher_rated=20,
    teacher_score=0.85,
    stage_age_s=120.0,
)


def with_(**changes: Any) -> Figures:
    return dataclasses.replace(GOOD, **changes)


def test_a_stage_that_passes_every_rule_advances() -> None:
    d = decide(POLICY, GOOD)
    assert (d.action, d.rule) == ("advance", "passed")
    assert "agreement 0.950 over 60 pairs" in d.reason


@pytest.mark.parametrize(
    ("changes", "rule", "says"),
    [
        ({"agreement": 0.85}, "agreement", "agreement 0.850 over 60 shadow pairs is below 0.9"),
        ({"student_p95_s": 0.81}, "latency", "p95 latency 0.810 s is above the teacher's 0.800"),
        ({"student_errors": 2}, "errors", "error rate 0.033 (2/60) is above the teacher's 0.010"),
        ({"student_score": 0.8}, "feedback", "mean feedback 0.800 on 12 student answers"),
    ],
)
def test_each_broken_rule_rolls_back_with_its_reason(
    changes: dict[str, Any], rule: str, says: str
) -> None:
    d = decide(POLICY, with_(**changes))
    assert (d.action, d.rule) == ("rollback", rule)
    assert says in d.reason


def test_a_broken_rule_rolls_back_even_before_the_stage_could_advance() -> None:
    # Young stage, few answers: it could not advance, but agreement already broke.
    d = decide(POLICY, with_(agreement=0.5, stage_age_s=1.0, student_answers=5))
    assert (d.action, d.rule) == ("rollback", "agreement")


def test_rules_wait_for_enough_data_before_judging() -> None:
    # Too few pairs: a bad agreement is not yet a verdict, it is a hold.
    d = decide(POLICY, with_(pairs=49, agreement=0.0))
    assert (d.action, d.rule) == ("hold", "agreement")
    assert "49 of 50" in d.reason
    # Too few answers on one side: neither latency nor errors are judged.
    d = decide(POLICY, with_(teacher_answers=19, teacher_errors=0, student_p95_s=9.0))
    assert (d.action, d.rule) == ("hold", "latency")
    d = decide(POLICY, with_(student_answers=19, student_errors=10))
    assert (d.action, d.rule) == ("hold", "latency")
    # Too young a stage.
    d = decide(POLICY, with_(stage_age_s=59.0))
    assert (d.action, d.rule) == ("hold", "min_stage_s")


def test_feedback_needs_ratings_on_both_sides_and_never_holds_a_stage_back() -> None:
    d = decide(POLICY, with_(student_rated=9, student_score=0.0))
    assert d.action == "advance"
    assert "feedback not judged yet (9/20 rated)" in d.reason
    d = decide(POLICY, with_(student_rated=0, student_score=None, teacher_rated=0))
    assert d.action == "advance"


def test_tolerances_loosen_each_rule() -> None:
    loose = msgspec.structs.replace(
        POLICY, max_latency_ratio=1.5, max_error_rate_delta=0.05, max_feedback_drop=0.1
    )
    assert decide(loose, with_(student_p95_s=1.2)).action == "advance"
    assert decide(loose, with_(student_p95_s=1.21)).rule == "latency"
    assert decide(loose, with_(student_errors=3)).action == "advance"
    assert decide(loose, with_(student_errors=4)).rule == "errors"
    assert decide(loose, with_(student_score=0.76)).action == "advance"
    assert decide(loose, with_(student_score=0.74)).rule == "feedback"


def test_equal_figures_are_not_worse() -> None:
    d = decide(POLICY, with_(student_p95_s=0.8, student_score=0.85, teacher_errors=0))
    assert d.action == "advance"
    assert decide(POLICY, with_(agreement=0.9)).action == "advance"


def test_p95_is_the_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([float(i) for i in range(1, 21)]) == 19.0


def test_saving_at_a_split() -> None:
    f = with_(teacher_usd_per_1k_tokens=0.10, student_usd_per_1k_tokens=0.02)
    assert f.saving(0.25) == pytest.approx(0.2)
    assert f.saving(1.0) == pytest.approx(0.8)
    assert with_(teacher_usd_per_1k_tokens=None).saving(1.0) is None
    assert with_(teacher_usd_per_1k_tokens=0.0, student_usd_per_1k_tokens=0.0).saving(1.0) is None


def pair(outcome: str, latency: float = 0.1, cost: float | None = 1e-4) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "agree": {"agree": True, "disagree": False}.get(outcome),
        "student_latency_s": latency if outcome != "error" else None,
        "teacher_latency_s": 0.5,
        "student_cost_usd": cost if outcome != "error" else None,
        "student_tokens": 10,
        "prompt_tokens": 10,
    }


def answer(
    status: str = "ok", latency: float = 0.5, cost: float = 1e-3, score: Any = None
) -> dict[str, Any]:
    return {"status": status, "latency_s": latency, "cost_usd": cost, "tokens": 20, "score": score}


def test_figures_from_rows() -> None:
    data = StageData(
        pairs=[pair("agree"), pair("agree"), pair("disagree", 0.3), pair("error")],
        teacher=[answer(score=1.0), answer(score=0.5), answer("error", 2.0)],
        student=[answer(latency=0.2, cost=2e-4, score=0.0), answer("error")],
    )
    f = figures_from(data, 42.0)
    assert f.pairs == 3
    assert f.agreement == pytest.approx(2 / 3)
    assert (f.student_answers, f.student_errors) == (4 + 2, 1 + 1)
    assert (f.teacher_answers, f.teacher_errors) == (3, 1)
    assert f.student_p95_s == 0.3  # shadow answers and live ones, failed ones left out
    assert f.teacher_p95_s == 0.5
    assert (f.student_rated, f.student_score) == (1, 0.0)
    assert (f.teacher_rated, f.teacher_score) == (2, 0.75)
    assert f.stage_age_s == 42.0
    assert f.teacher_usd_per_1k_tokens == pytest.approx(2e-3 / 40 * 1000)
    # Student: 3 compared pairs (1e-4 over 20 tokens each) + its one ok live answer.
    assert f.student_usd_per_1k_tokens == pytest.approx((3e-4 + 2e-4) / 80 * 1000)
    empty = figures_from(StageData([], [], []), 0.0)
    assert (empty.pairs, empty.agreement, empty.student_p95_s) == (0, None, None)
    assert decide(POLICY, empty).rule == "agreement"
