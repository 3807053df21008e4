"""The rollout policy: a pure function from a stage's figures to advance, hold or rollback.

A stage advances when, on its own traffic (since the stage began):

- **agreement**: at least ``min_pairs`` shadow pairs were compared and the student agreed
  on at least ``min_agreement`` of them;
- **latency**: the student's p95 latency is at most ``max_latency_ratio`` times the
  teacher's (each over at least ``min_requests`` answers);
- **errors**: the student's error rate is at most the teacher's plus ``max_error_rate_delta``;
- **feedback**: the mean feedback score on the student's answers is at least the teacher's
  minus ``max_feedback_drop`` (judged once both sides have ``min_feedback`` rated answers;
  before that, feedback does not hold a stage back);
- and the stage has lasted ``min_stage_s``.

Any rule that breaks on enough data rolls the rollout back at once, at every stage (also
while paused). Otherwise the stage holds, and the decision says what it waits for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from retort.rollout import DEFAULT_STEPS

if TYPE_CHECKING:
    from retort.db.rollouts import StageData

__all__ = ["Decision", "Figures", "RolloutPolicy", "decide", "figures_from", "p95"]

Action = Literal["advance", "hold", "rollback"]


class RolloutPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    steps: list[float] = msgspec.field(default_factory=lambda: list(DEFAULT_STEPS))
    """Live shares between shadow (0) and full (1): canary, then the ramp."""
    min_pairs: int = 50
    """Shadow pairs a stage needs before its agreement counts (to advance or roll back)."""
    min_agreement: float = 0.9
    """Share of those pairs where the student must agree with the teacher."""
    min_requests: int = 20
    """Answers each side needs before latency and error rates are compared (the student's
    are its shadow answers plus its live ones)."""
    max_latency_ratio: float = 1.0
    """Student p95 latency / teacher p95 latency allowed (1.0: not worse)."""
    max_error_rate_delta: float = 0.0
    """How much higher than the teacher's the student's error rate may be."""
    min_feedback: int = 10
    """Rated answers each side needs before feedback scores are compared."""
    max_feedback_drop: float = 0.0
    """How far below the teacher's the student's mean feedback score may be."""
    min_stage_s: float = 60.0
    """The shortest time a stage lasts before it may advance."""


@dataclass(frozen=True, slots=True)
class Figures:
    """What a stage is judged on (all measured since it began)."""

    pairs: int = 0
    """Shadow pairs compared (agree or disagree)."""
    agreement: float | None = None
    student_answers: int = 0
    """Shadow answers (including failed ones) plus live answers of the student."""
    student_errors: int = 0
    teacher_answers: int = 0
    teacher_errors: int = 0
    student_p95_s: float | None = None
    teacher_p95_s: float | None = None
    student_rated: int = 0
    student_score: float | None = None
    teacher_rated: int = 0
    teacher_score: float | None = None
    stage_age_s: float = 0.0
    teacher_usd_per_1k_tokens: float | None = None
    student_usd_per_1k_tokens: float | None = None

    @property
    def student_error_rate(self) -> float | None:
        return self.student_errors / self.student_answers if self.student_answers else None

    @property
    def teacher_error_rate(self) -> float | None:
        return self.teacher_errors / self.teacher_answers if self.teacher_answers else None

    def saving(self, share: float) -> float | None:
        """Projected share of the teacher's cost saved at ``share`` (0..1), from the
        measured cost per 1k tokens of both."""
        t, s = self.teacher_usd_per_1k_tokens, self.student_usd_per_1k_tokens
        if t is None or s is None or t <= 0:
            return None
        return share * (1.0 - s / t)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["student_error_rate"] = self.student_error_rate
        out["teacher_error_rate"] = self.teacher_error_rate
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str
    """Which rule decided: ``agreement``, ``latency``, ``errors``, ``feedback``,
    ``min_stage_s``, ``passed``."""
    reason: str


def p95(xs: list[float]) -> float | None:
    """The nearest-rank 95th percentile (``None`` for no values)."""
    if not xs:
        return None
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _per_1k(cost: float, tokens: int) -> float | None:
    return cost / tokens * 1000.0 if tokens > 0 else None


def figures_from(data: StageData, stage_age_s: float) -> Figures:
    """A stage's :class:`Figures` from its rows (:meth:`RolloutStore.stage_data`)."""
    compared = [p for p in data.pairs if p["agree"] is not None]
    shadow_answers = [p for p in data.pairs if p["outcome"] in ("agree", "disagree", "error")]
    s_lat = [float(p["student_latency_s"]) for p in compared if p["student_latency_s"] is not None]
    s_lat += [float(r["latency_s"]) for r in data.student if r["status"] == "ok"]
    t_lat = [float(r["latency_s"]) for r in data.teacher if r["status"] == "ok"]
    s_scores = [float(r["score"]) for r in data.student if r["score"] is not None]
    t_scores = [float(r["score"]) for r in data.teacher if r["score"] is not None]
    t_cost = sum(float(r["cost_usd"]) for r in data.teacher if r["status"] == "ok")
    t_tokens = sum(int(r["tokens"]) for r in data.teacher if r["status"] == "ok")
    s_cost = sum(float(r["cost_usd"]) for r in data.student if r["status"] == "ok")
    s_tokens = sum(int(r["tokens"]) for r in data.student if r["status"] == "ok")
    for p in compared:
        if p["student_cost_usd"] is not None:
            s_cost += float(p["student_cost_usd"])
            s_tokens += int(p["student_tokens"]) + int(p["prompt_tokens"] or 0)
    return Figures(
        pairs=len(compared),
        agreement=(sum(1 for p in compared if p["agree"]) / len(compared)) if compared else None,
        student_answers=len(shadow_answers) + len(data.student),
        student_errors=sum(1 for p in shadow_answers if p["outcome"] == "error")
        + sum(1 for r in data.student if r["status"] != "ok"),
        teacher_answers=len(data.teacher),
        teacher_errors=sum(1 for r in data.teacher if r["status"] != "ok"),
        student_p95_s=p95(s_lat),
        teacher_p95_s=p95(t_lat),
        student_rated=len(s_scores),
        student_score=_mean(s_scores),
        teacher_rated=len(t_scores),
        teacher_score=_mean(t_scores),
        stage_age_s=stage_age_s,
        teacher_usd_per_1k_tokens=_per_1k(t_cost, t_tokens),
        student_usd_per_1k_tokens=_per_1k(s_cost, s_tokens),
    )


def decide(policy: RolloutPolicy, f: Figures) -> Decision:
    """Advance, hold or roll back a stage on its figures (pure; see the module doc)."""
    # Every rule that can be judged is, first: any break rolls back.
    judged = f.pairs >= policy.min_pairs and f.agreement is not None
    if judged and f.agreement is not None and f.agreement < policy.min_agreement:
        return Decision(
            "rollback",
            "agreement",
            f"agreement {f.agreement:.3f} over {f.pairs} shadow pairs is below "
            f"{policy.min_agreement}",
        )
    enough = f.student_answers >= policy.min_requests and f.teacher_answers >= policy.min_requests
    if enough:
        s_rate, t_rate = f.student_error_rate or 0.0, f.teacher_error_rate or 0.0
        if s_rate > t_rate + policy.max_error_rate_delta:
            return Decision(
                "rollback",
                "errors",
                f"student error rate {s_rate:.3f} ({f.student_errors}/{f.student_answers}) "
                f"is above the teacher's {t_rate:.3f} ({f.teacher_errors}/{f.teacher_answers})"
                + (f" + {policy.max_error_rate_delta}" if policy.max_error_rate_delta else ""),
            )
        if f.student_p95_s is not None and f.teacher_p95_s is not None:
            limit = f.teacher_p95_s * policy.max_latency_ratio
            if f.student_p95_s > limit:
                return Decision(
                    "rollback",
                    "latency",
                    f"student p95 latency {f.student_p95_s:.3f} s is above the teacher's "
                    f"{f.teacher_p95_s:.3f} s x {policy.max_latency_ratio}",
                )
    rated = f.student_rated >= policy.min_feedback and f.teacher_rated >= policy.min_feedback
    scores = (f.student_score, f.teacher_score) if rated else (None, None)
    if (
        scores[0] is not None
        and scores[1] is not None
        and scores[0] < scores[1] - policy.max_feedback_drop
    ):
        return Decision(
            "rollback",
            "feedback",
            f"mean feedback {scores[0]:.3f} on {f.student_rated} student answers is "
            f"below the teacher's {scores[1]:.3f} ({f.teacher_rated})"
            + (f" - {policy.max_feedback_drop}" if policy.max_feedback_drop else ""),
        )
    # Nothing broke: advance once every rule has had its data and the stage its time.
    if f.pairs < policy.min_pairs:
        return Decision(
            "hold", "agreement", f"waiting for shadow pairs: {f.pairs} of {policy.min_pairs}"
        )
    if not enough:
        return Decision(
            "hold",
            "latency",
            f"waiting for answers: student {f.student_answers}, teacher {f.teacher_answers} "
            f"of {policy.min_requests} each",
        )
    if f.stage_age_s < policy.min_stage_s:
        return Decision(
            "hold",
            "min_stage_s",
            f"the stage has lasted {f.stage_age_s:.0f} s of {policy.min_stage_s:.0f} s",
        )
    feedback = (
        f"feedback {f.student_score:.3f} >= {f.teacher_score:.3f}"
        if rated and f.student_score is not None and f.teacher_score is not None
        else f"feedback not judged yet ({f.student_rated}/{f.teacher_rated} rated)"
    )
    return Decision(
        "advance",
        "passed",
        f"agreement {f.agreement:.3f} over {f.pairs} pairs; p95 {f.student_p95_s or 0:.3f} s "
        f"vs {f.teacher_p95_s or 0:.3f} s; errors {f.student_errors}/{f.student_answers} "
        f"vs {f.teacher_errors}/{f.teacher_answers}; {feedback}",
    )
