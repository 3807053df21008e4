"""The gateway's side of staged rollouts: the live split, shadow copies, and the evaluator.

:class:`RolloutService` keeps each teacher's latest rollout (read from the database every
``refresh_s``, and at once after its own writes), so every replica applies the same split:
:meth:`RolloutService.split` feeds :meth:`gateway.studentpool.StudentPool.split_for`
(``students.traffic`` for the same teacher still wins: it is the manual override), and
:meth:`RolloutService.shadow_target` gives :class:`gateway.shadow.ShadowRunner` the student
to copy the teacher's requests to while the rollout is live. Every ``interval_s`` the
evaluator judges each live rollout's stage (:func:`gateway.rollout.policy.decide`) and stores
the decision with its reason and figures; two replicas deciding at once store it once.

The operator's actions (start, pause, resume, promote, rollback) are :func:`operate`, shared
by the admin API and ``retort students rollout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gateway.rollout.policy import Decision, Figures, RolloutPolicy, decide, figures_from
from gateway.shadow import Measure, ShadowTarget
from retort import rollout as machine
from retort.rollout import FINAL, Rollout, RolloutError, RolloutEvent

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.studentpool import StudentPool
    from gateway.students import StudentRegistry
    from retort.db.rollouts import RolloutStore

__all__ = [
    "OPERATIONS",
    "RolloutService",
    "RolloutSettings",
    "find",
    "operate",
    "stage_value",
    "status_of",
    "teacher_of",
]

log = logging.getLogger("retort.rollout")

Operation = Literal["start", "pause", "resume", "promote", "rollback"]
OPERATIONS: tuple[str, ...] = ("start", "pause", "resume", "promote", "rollback")
LOAD_RETRY_S = 60.0
"""How long after a failed load a rollout's student is tried again (its shadow copies fail
meanwhile, and count as its errors)."""


class RolloutSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    """Apply rollouts stored in the database (needs the prompt log on) and run the evaluator."""
    interval_s: float = 10.0
    """How often the evaluator judges each live rollout."""
    refresh_s: float = 2.0
    """How often the rollout state is re-read from the database (other replicas' and the
    CLI's changes show up within this)."""
    shadow_share: float = 0.2
    """Share of the teacher's requests (those it answers) copied to the student while the
    rollout is live: the pairs the agreement rule counts."""
    measure: Measure = "auto"
    """How shadow answers are compared (see ``shadow.teachers``)."""
    min_rouge_l: float = 0.7
    policy: RolloutPolicy = msgspec.field(default_factory=RolloutPolicy)


def stage_value(r: Rollout) -> int:
    """``retort_rollout_stage``: the step index, -1 once rolled back."""
    return -1 if r.status == "rolled_back" else r.step


async def operate(
    store: RolloutStore,
    op: str,
    teacher: str,
    *,
    student: str | None = None,
    steps: list[float] | None = None,
    reason: str | None = None,
    actor: str = "operator",
) -> tuple[Rollout, RolloutEvent]:
    """An operator's action on the teacher's rollout, stored (:class:`RolloutError` when
    the state does not allow it, :class:`LookupError` when there is no rollout)."""
    current = await store.latest(teacher)
    if op == "start":
        if student is None:
            raise RolloutError("start needs the student")
        if current is not None and current.status == "paused" and current.student == student:
            op = "resume"
        else:
            r, event = machine.start(
                teacher,
                student,
                steps if steps is not None else list(machine.DEFAULT_STEPS),
                current=current,
                actor=actor,
                reason=reason or "started",
            )
            return await store.create(r, event), event
    if current is None:
        raise LookupError(f"`{teacher}` has no rollout")
    if student is not None and student != current.student:
        raise RolloutError(f"the rollout of `{teacher}` is to `{current.student}`, not `{student}`")
    if op == "pause":
        after, event = machine.pause(current, actor=actor, reason=reason or "paused")
    elif op == "resume":
        after, event = machine.resume(current, actor=actor, reason=reason or "resumed")
    elif op == "promote":
        after, event = machine.advance(current, actor=actor, reason=reason or "promoted by hand")
    elif op == "rollback":
        after, event = machine.rollback(
            current, actor=actor, reason=reason or "rolled back by hand"
        )
    else:
        raise RolloutError(f"unknown rollout action {op!r}; one of {', '.join(OPERATIONS)}")
    stored = await store.apply(after, event)
    if stored is None:
        raise RolloutError(f"the rollout of `{teacher}` changed meanwhile; try again")
    return stored, event


async def find(store: RolloutStore, student: str, teacher: str | None = None) -> Rollout:
    """The latest rollout of ``student`` (of ``teacher``'s, when given); :class:`LookupError`
    when there is none, :class:`RolloutError` when the student has several teachers'."""
    if teacher is not None:
        r = await store.latest(teacher)
        if r is None or r.student != student:
            raise LookupError(f"`{student}` has no rollout for `{teacher}`")
        return r
    found = [r for r in (await store.current()).values() if r.student == student]
    if not found:
        raise LookupError(f"`{student}` has no rollout")
    if len(found) > 1:
        names = ", ".join(sorted(r.teacher for r in found))
        raise RolloutError(f"`{student}` has rollouts for several teachers ({names}): name one")
    return found[0]


def teacher_of(registry: StudentRegistry, student: str) -> str:
    """The teacher a published student was distilled from: its adapter, else its base model."""
    from gateway.students import StudentError

    try:
        manifest = registry.get(student).manifest
    except StudentError as exc:
        raise LookupError(str(exc)) from exc
    return manifest.adapter or manifest.teacher_model


class RolloutService:
    """Rollout state for one gateway process, and its evaluator."""

    def __init__(
        self,
        settings: RolloutSettings,
        store: RolloutStore,
        *,
        students: StudentPool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not 0.0 <= settings.shadow_share <= 1.0:
            raise ValueError("rollout.shadow_share must be within [0, 1]")
        machine.make_plan(settings.policy.steps)  # fail at start on a bad plan
        self.settings = settings
        self.store = store
        self.students = students
        self.metrics = metrics
        self.current: dict[str, Rollout] = {}
        """Teacher -> its latest rollout (as last read)."""
        self.figures: dict[str, Figures] = {}
        """Teacher -> the figures of its rollout's stage at the last evaluation."""
        self._labels: set[tuple[str, str]] = set()
        self._loading: set[str] = set()
        self._failed: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    # -- what requests see ---------------------------------------------------------------

    def split(self, teacher: str) -> tuple[str, float] | None:
        """``(student, share)`` of the teacher's live requests, or ``None``."""
        r = self.current.get(teacher)
        if r is None or r.share <= 0.0:
            return None
        return r.student, r.share

    def shadow_target(self, teacher: str) -> ShadowTarget | None:
        """While a rollout is live, the teacher's answers are copied to its student."""
        r = self.current.get(teacher)
        if r is None or not r.shadowing or self.settings.shadow_share <= 0.0:
            return None
        return ShadowTarget(
            student=r.student,
            share=self.settings.shadow_share,
            measure=self.settings.measure,
            min_rouge_l=self.settings.min_rouge_l,
        )

    # -- state -----------------------------------------------------------------------------

    async def refresh(self) -> dict[str, Rollout]:
        """Re-read every teacher's latest rollout; update the gauges; load students that
        are (or are about to be) answering."""
        current = await self.store.current()
        self.current = current
        seen = set()
        for r in current.values():
            seen.add((r.teacher, r.student))
            if self.metrics is not None:
                self.metrics.rollout_state(r.teacher, r.student, stage_value(r), r.share)
            if r.status != "rolled_back":
                self._ensure_loaded(r.student)
        if self.metrics is not None:
            for teacher, student in self._labels - seen:
                self.metrics.rollout_forget(teacher, student)
        self._labels = seen
        return current

    def _ensure_loaded(self, student: str) -> None:
        pool = self.students
        if pool is None or pool.get(student) is not None or student in self._loading:
            return
        if time.monotonic() - self._failed.get(student, -LOAD_RETRY_S) < LOAD_RETRY_S:
            return
        self._loading.add(student)

        async def load() -> None:
            try:
                await pool.load(student)
                self._failed.pop(student, None)
            except Exception as exc:
                self._failed[student] = time.monotonic()
                log.error(
                    "rollout: student %s cannot be loaded (retrying in %.0f s): %s",
                    student,
                    LOAD_RETRY_S,
                    exc,
                )
            finally:
                self._loading.discard(student)

        task = asyncio.get_running_loop().create_task(load())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stage_figures(self, r: Rollout, now: float | None = None) -> Figures:
        t = time.time() if now is None else now
        data = await self.store.stage_data(r.teacher, r.student, r.stage_since)
        return figures_from(data, max(0.0, t - r.stage_since))

    async def evaluate(self, now: float | None = None) -> list[tuple[Rollout, Decision]]:
        """Judge every live rollout once; returns the decisions taken (stored or not)."""
        out = []
        for r in (await self.refresh()).values():
            if r.status in FINAL:
                continue
            try:
                out.append((r, await self._evaluate(r, now)))
            except Exception:
                log.exception("rollout: evaluating %s -> %s failed", r.teacher, r.student)
        return out

    async def _evaluate(self, r: Rollout, now: float | None) -> Decision:
        t = time.time() if now is None else now
        f = await self.stage_figures(r, t)
        self.figures[r.teacher] = f
        d = decide(self.settings.policy, f)
        if self.metrics is not None:
            self.metrics.rollout_figures(r.teacher, r.student, f.agreement, f.saving(r.share))
        if d.action == "advance" and r.status != "active":
            d = Decision("hold", "paused", f"paused; the policy would advance: {d.reason}")
        figures = f.to_json()
        if d.action == "rollback":
            after, event = machine.rollback(r, reason=d.reason, rule=d.rule, figures=figures, now=t)
        elif d.action == "advance":
            after, event = machine.advance(r, reason=d.reason, rule=d.rule, figures=figures, now=t)
        elif r.last_rule != d.rule:
            # A hold is stored when what the stage waits for changes (not every interval).
            after, event = machine.hold(r, reason=d.reason, rule=d.rule, figures=figures, now=t)
        else:
            return d
        stored = await self.store.apply(after, event)
        if stored is None:  # another replica (or an operator) decided first
            return d
        self.record(stored, event)
        return d

    def record(self, r: Rollout, event: RolloutEvent) -> None:
        """A stored decision: log it, count it, and apply it here at once."""
        log.info(
            "rollout %s -> %s: %s by %s (%s -> %s, share %.2f): %s",
            r.teacher,
            r.student,
            event.action,
            event.actor,
            event.from_stage,
            event.to_stage,
            event.share,
            event.reason,
        )
        self.current[r.teacher] = r
        if self.metrics is not None:
            self.metrics.rollout_decision(r.teacher, r.student, event.action)
            self.metrics.rollout_state(r.teacher, r.student, stage_value(r), r.share)

    async def operate(self, op: str, teacher: str, **kwargs: Any) -> tuple[Rollout, RolloutEvent]:
        if op == "start" and "steps" not in kwargs:
            kwargs["steps"] = list(self.settings.policy.steps)
        r, event = await operate(self.store, op, teacher, **kwargs)
        self.record(r, event)
        if r.status != "rolled_back":
            self._ensure_loaded(r.student)
        return r, event

    def start(self) -> None:
        """Run :meth:`run` in the background (the gateway's lifespan)."""
        self._runner = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    async def run(self) -> None:
        """Refresh every ``refresh_s`` and evaluate every ``interval_s``, until cancelled."""
        last_eval = 0.0
        failing = False
        while True:
            try:
                if time.monotonic() - last_eval >= self.settings.interval_s:
                    last_eval = time.monotonic()
                    await self.evaluate()
                else:
                    await self.refresh()
                if failing:
                    log.info("rollout: the rollout state is readable again")
                failing = False
            except Exception as exc:  # the database may be away for a while: say so once
                if not failing:
                    log.error(
                        "rollout: cannot read the rollout state (the last one read stays "
                        "in force): %s",
                        exc,
                    )
                failing = True
            await asyncio.sleep(min(self.settings.refresh_s, self.settings.interval_s))

    async def status(self, teacher: str, *, events: int = 20) -> dict[str, Any]:
        """The teacher's rollout, its stage's figures (with costs and the projected
        saving at the current split), what the policy would decide now, and its events."""
        r = await self.store.latest(teacher)
        if r is None:
            raise LookupError(f"`{teacher}` has no rollout")
        return await status_of(
            self.store, r, self.settings.policy, events=events, override=self._override(teacher)
        )

    def _override(self, teacher: str) -> bool:
        pool = self.students
        return pool is not None and teacher in pool.settings.traffic


async def status_of(
    store: RolloutStore,
    r: Rollout,
    policy: RolloutPolicy,
    *,
    events: int = 20,
    override: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """A rollout's status (the admin API's and the CLI's)."""
    t = time.time() if now is None else now
    f = figures_from(await store.stage_data(r.teacher, r.student, r.stage_since), t - r.stage_since)
    d = decide(policy, f) if r.status not in FINAL else None
    return {
        "rollout": r.to_json(),
        "override": override,
        "figures": f.to_json(),
        "cost": {
            "teacher_usd_per_1k_tokens": f.teacher_usd_per_1k_tokens,
            "student_usd_per_1k_tokens": f.student_usd_per_1k_tokens,
            "projected_saving_ratio": f.saving(r.share),
            "at_share": r.share,
        },
        "next": None if d is None else {"action": d.action, "rule": d.rule, "reason": d.reason},
        "events": await store.events(rollout_id=r.id, limit=events),
    }
