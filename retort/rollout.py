"""The staged rollout of a student in place of its teacher: the state machine (pure).

A rollout moves a teacher's live traffic (the base model's or an adapter's) to a student
through the steps of its plan: ``shadow`` (share 0: the student only answers shadow
copies), ``canary`` (the first share, e.g. 5%), ``ramp`` (the next shares, e.g. 25%, 50%)
and ``full`` (share 1). Its ``status`` is ``active`` (the gateway's policy decides),
``paused`` (the split stays where it is and is not advanced automatically; the policy still
rolls back), ``complete`` (the student answers everything) or ``rolled_back`` (the teacher
answers everything again). Each transition returns the new state and the
:class:`RolloutEvent` that records it; nothing here does I/O. The gateway (``gateway.rollout``)
and ``retort distill run --rollout`` store both through :mod:`retort.db.rollouts`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "DEFAULT_STEPS",
    "FINAL",
    "Rollout",
    "RolloutError",
    "RolloutEvent",
    "advance",
    "hold",
    "make_plan",
    "pause",
    "resume",
    "rollback",
    "stage_name",
    "start",
    "steps_from",
]

Status = Literal["active", "paused", "complete", "rolled_back"]
FINAL: frozenset[str] = frozenset({"complete", "rolled_back"})
DEFAULT_STEPS: tuple[float, ...] = (0.05, 0.25, 0.5)
"""The live shares between shadow (0) and full (1): canary 5%, ramp 25% and 50%."""
ACTIONS = ("start", "advance", "hold", "rollback", "pause", "resume")


class RolloutError(ValueError):
    """A transition the rollout's state does not allow (the API answers 409)."""


def make_plan(steps: tuple[float, ...] | list[float] = DEFAULT_STEPS) -> list[float]:
    """``[0.0, *steps, 1.0]``; ``steps`` strictly increasing within (0, 1)."""
    prev = 0.0
    for s in steps:
        if not prev < s < 1.0:
            raise RolloutError(
                f"rollout steps must increase strictly within (0, 1), got {list(steps)}"
            )
        prev = s
    return [0.0, *(float(s) for s in steps), 1.0]


def steps_from(section: dict[str, Any]) -> list[float]:
    """The plan's live shares from a config's ``rollout:`` section (the libraries read the
    gateway's config as plain data), :data:`DEFAULT_STEPS` when it names none."""
    policy = section.get("policy") or {}
    steps = policy.get("steps", DEFAULT_STEPS) if isinstance(policy, dict) else DEFAULT_STEPS
    return make_plan([float(s) for s in steps])[1:-1]


def stage_name(step: int, plan: list[float]) -> str:
    """``shadow``, ``canary``, ``ramp`` or ``full`` for a step of ``plan``."""
    if step <= 0:
        return "shadow"
    if step >= len(plan) - 1:
        return "full"
    return "canary" if step == 1 else "ramp"


@dataclass(frozen=True, slots=True)
class Rollout:
    """One rollout (a row of ``rollouts``)."""

    teacher: str
    student: str
    plan: list[float]
    status: Status = "active"
    step: int = 0
    id: int | None = None
    created: float = 0.0
    updated: float = 0.0
    stage_since: float = 0.0
    """When the current step began: the policy judges each stage on its own traffic."""
    version: int = 0
    """Bumped by every stored decision; a write expecting an older version loses (so two
    replicas evaluating at once store one decision, not two)."""
    last_rule: str | None = None
    """The rule of the last stored decision (a hold is stored only when it changes)."""
    reason: str | None = None

    @property
    def stage(self) -> str:
        if self.status == "rolled_back":
            return "rolled_back"
        return stage_name(self.step, self.plan)

    @property
    def share(self) -> float:
        """The share of the teacher's live requests the student answers now."""
        if self.status == "rolled_back":
            return 0.0
        if self.status == "complete":
            return 1.0
        return self.plan[min(self.step, len(self.plan) - 1)]

    @property
    def shadowing(self) -> bool:
        """Whether the teacher's answers are still copied to the student (to measure it)."""
        return self.status in ("active", "paused")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stage"] = self.stage
        out["share"] = self.share
        return out


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    """One decision (a row of ``rollout_events``): what was done, by whom, why, on what figures."""

    teacher: str
    student: str
    action: str
    actor: str
    """``policy`` (the gateway's evaluator) or ``operator`` (CLI, admin API, distill)."""
    from_stage: str
    to_stage: str
    share: float
    reason: str
    rule: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    rollout_id: int | None = None
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _event(
    before: Rollout | None,
    after: Rollout,
    action: str,
    actor: str,
    reason: str,
    now: float,
    rule: str | None,
    figures: dict[str, Any] | None,
) -> RolloutEvent:
    return RolloutEvent(
        teacher=after.teacher,
        student=after.student,
        action=action,
        actor=actor,
        from_stage=before.stage if before is not None else "none",
        to_stage=after.stage,
        share=after.share,
        reason=reason,
        rule=rule,
        figures=dict(figures or {}),
        created=now,
        rollout_id=after.id,
    )


def start(
    teacher: str,
    student: str,
    steps: tuple[float, ...] | list[float] = DEFAULT_STEPS,
    *,
    current: Rollout | None = None,
    actor: str = "operator",
    reason: str = "started",
    now: float | None = None,
) -> tuple[Rollout, RolloutEvent]:
    """A new rollout in shadow. ``current`` is the teacher's latest rollout: one that is
    still active or paused must be finished (promoted to full or rolled back) first."""
    if not teacher or not student:
        raise RolloutError("a rollout needs a teacher and a student")
    if teacher == student:
        raise RolloutError("a student cannot replace itself")
    if current is not None and current.status not in FINAL:
        raise RolloutError(
            f"`{teacher}` already has a {current.status} rollout to `{current.student}` "
            f"(stage {current.stage}); roll it back or finish it first"
        )
    t = time.time() if now is None else now
    r = Rollout(teacher, student, make_plan(steps), created=t, updated=t, stage_since=t)
    return r, _event(None, r, "start", actor, reason, t, None, None)


def _live(r: Rollout, what: str) -> None:
    if r.status in FINAL:
        raise RolloutError(f"the rollout of `{r.student}` is {r.status}: it cannot {what}")


def advance(
    r: Rollout,
    *,
    actor: str = "policy",
    reason: str = "promoted",
    rule: str | None = None,
    figures: dict[str, Any] | None = None,
    now: float | None = None,
) -> tuple[Rollout, RolloutEvent]:
    """One step forward; past the last live share the rollout is ``complete`` (full)."""
    _live(r, "advance")
    if actor == "policy" and r.status != "active":
        raise RolloutError(f"the rollout of `{r.student}` is {r.status}: the policy waits")
    t = time.time() if now is None else now
    step = r.step + 1
    status: Status = "complete" if step >= len(r.plan) - 1 else r.status
    after = dataclasses.replace(
        r, step=step, status=status, updated=t, stage_since=t, last_rule=rule, reason=reason
    )
    return after, _event(r, after, "advance", actor, reason, t, rule, figures)


def rollback(
    r: Rollout,
    *,
    actor: str = "policy",
    reason: str = "rolled back",
    rule: str | None = None,
    figures: dict[str, Any] | None = None,
    now: float | None = None,
) -> tuple[Rollout, RolloutEvent]:
    """Back to the teacher, at once (also from ``complete``: the operator's way back)."""
    if r.status == "rolled_back":
        raise RolloutError(f"the rollout of `{r.student}` is already rolled back")
    t = time.time() if now is None else now
    after = dataclasses.replace(
        r, status="rolled_back", updated=t, stage_since=t, last_rule=rule, reason=reason
    )
    return after, _event(r, after, "rollback", actor, reason, t, rule, figures)


def pause(
    r: Rollout, *, actor: str = "operator", reason: str = "paused", now: float | None = None
) -> tuple[Rollout, RolloutEvent]:
    """Keep the current split; the policy stops advancing (it still rolls back)."""
    _live(r, "pause")
    if r.status == "paused":
        raise RolloutError(f"the rollout of `{r.student}` is already paused")
    t = time.time() if now is None else now
    after = dataclasses.replace(r, status="paused", updated=t, last_rule=None, reason=reason)
    return after, _event(r, after, "pause", actor, reason, t, None, None)


def resume(
    r: Rollout, *, actor: str = "operator", reason: str = "resumed", now: float | None = None
) -> tuple[Rollout, RolloutEvent]:
    """A paused rollout is judged by the policy again (its stage restarts its clock)."""
    if r.status != "paused":
        raise RolloutError(f"the rollout of `{r.student}` is {r.status}, not paused")
    t = time.time() if now is None else now
    after = dataclasses.replace(
        r, status="active", updated=t, stage_since=t, last_rule=None, reason=reason
    )
    return after, _event(r, after, "resume", actor, reason, t, None, None)


def hold(
    r: Rollout,
    *,
    reason: str,
    rule: str,
    figures: dict[str, Any] | None = None,
    now: float | None = None,
) -> tuple[Rollout, RolloutEvent]:
    """The policy keeps the stage (stored when its rule differs from the last decision's)."""
    t = time.time() if now is None else now
    after = dataclasses.replace(r, updated=t, last_rule=rule, reason=reason)
    return after, _event(r, after, "hold", "policy", reason, t, rule, figures)
