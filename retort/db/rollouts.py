"""Rollouts in the database (the ``rollouts`` and ``rollout_events`` tables, migration 0007).

Every replica reads the same rollout from here, so they apply the same split, and a
restarted gateway resumes where it stood. A decision is written with the version of the
state it was taken on (:meth:`RolloutStore.apply`): when two replicas decide at once, one
write wins and the other is dropped, so a decision is stored once. The figures the policy
judges a stage on come from the prompt log and the shadow table (:meth:`RolloutStore.stage_data`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from retort import rollout as machine
from retort.db.schema import feedback, requests, rollout_events, rollouts, shadow
from retort.rollout import Rollout, RolloutError, RolloutEvent

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["RolloutStore", "StageData", "start_rollout"]

ROW_LIMIT = 5000
"""At most this many of the newest rows per side feed a stage's figures."""


@dataclasses.dataclass(slots=True)
class StageData:
    """The raw rows a stage is judged on (since the stage began)."""

    pairs: list[dict[str, Any]]
    """Shadow pairs: ``outcome``, ``agree``, latencies, the student's cost and tokens, and
    the prompt tokens of the request they copy."""
    teacher: list[dict[str, Any]]
    """Requests answered by the teacher (its base model or adapter): ``status``,
    ``latency_s``, ``cost_usd``, ``tokens``, ``score`` (mean feedback, ``None`` unrated)."""
    student: list[dict[str, Any]]
    """Requests answered by the student (the live split, or asked for by its name)."""


def _rollout(row: Any) -> Rollout:
    return Rollout(
        id=int(row["id"]),
        teacher=row["teacher"],
        student=row["student"],
        status=row["status"],
        step=int(row["step"]),
        plan=[float(x) for x in row["plan"]],
        created=float(row["created"]),
        updated=float(row["updated"]),
        stage_since=float(row["stage_since"]),
        version=int(row["version"]),
        last_rule=row["last_rule"],
        reason=row["reason"],
    )


def _state(r: Rollout) -> dict[str, Any]:
    return {
        "status": r.status,
        "step": r.step,
        "updated": r.updated,
        "stage_since": r.stage_since,
        "last_rule": r.last_rule,
        "reason": r.reason,
    }


def _event_row(e: RolloutEvent, rollout_id: int) -> dict[str, Any]:
    row = dataclasses.asdict(e)
    row.pop("id")
    row["rollout_id"] = rollout_id
    return row


class RolloutStore:
    """Rollout state over the prompt log's database (an open ``PromptStore``'s engine)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, rollout: Rollout, event: RolloutEvent) -> Rollout:
        """Store a new rollout (from :func:`retort.rollout.start`) and its start event.
        Refused when the teacher's latest rollout is still live (another start won)."""
        async with self.engine.begin() as conn:
            latest = await conn.execute(
                sa.select(rollouts.c.status, rollouts.c.student)
                .where(rollouts.c.teacher == rollout.teacher)
                .order_by(rollouts.c.id.desc())
                .limit(1)
            )
            row = latest.first()
            if row is not None and row.status not in ("complete", "rolled_back"):
                raise RolloutError(
                    f"`{rollout.teacher}` already has a {row.status} rollout to `{row.student}`"
                )
            values = {
                "teacher": rollout.teacher,
                "student": rollout.student,
                "plan": rollout.plan,
                "created": rollout.created,
                "version": 0,
                **_state(rollout),
            }
            result = await conn.execute(rollouts.insert().values(**values))
            key = result.inserted_primary_key
            assert key is not None
            rid = int(key[0])
            await conn.execute(rollout_events.insert().values(**_event_row(event, rid)))
        return dataclasses.replace(rollout, id=rid, version=0)

    async def apply(self, after: Rollout, event: RolloutEvent) -> Rollout | None:
        """Store a decision taken on the state of version ``after.version``: the new state
        (version + 1) and its event, in one transaction. ``None`` when the rollout changed
        meanwhile (another replica or an operator decided first): nothing is stored."""
        if after.id is None:
            raise ValueError("the rollout has no id: create it first")
        async with self.engine.begin() as conn:
            result = await conn.execute(
                rollouts.update()
                .where(rollouts.c.id == after.id, rollouts.c.version == after.version)
                .values(version=after.version + 1, **_state(after))
            )
            if result.rowcount != 1:
                return None
            await conn.execute(rollout_events.insert().values(**_event_row(event, after.id)))
        return dataclasses.replace(after, version=after.version + 1)

    async def latest(self, teacher: str) -> Rollout | None:
        """The teacher's latest rollout (live or finished)."""
        stmt = (
            sa.select(rollouts)
            .where(rollouts.c.teacher == teacher)
            .order_by(rollouts.c.id.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        return _rollout(row) if row is not None else None

    async def current(self) -> dict[str, Rollout]:
        """Each teacher's latest rollout (what decides its split)."""
        newest = (
            sa.select(sa.func.max(rollouts.c.id).label("id"))
            .group_by(rollouts.c.teacher)
            .subquery("newest")
        )
        stmt = sa.select(rollouts).join(newest, newest.c.id == rollouts.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return {r.teacher: r for r in map(_rollout, rows)}

    async def events(
        self, *, rollout_id: int | None = None, teacher: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Decisions, newest first."""
        stmt = sa.select(rollout_events).order_by(rollout_events.c.id.desc()).limit(limit)
        if rollout_id is not None:
            stmt = stmt.where(rollout_events.c.rollout_id == rollout_id)
        if teacher is not None:
            stmt = stmt.where(rollout_events.c.teacher == teacher)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(stmt)).mappings().all()]

    async def stage_data(self, teacher: str, student: str, since: float) -> StageData:
        """The shadow pairs and the teacher's and student's live answers since ``since``."""
        fb = (
            sa.select(feedback.c.request_id, sa.func.avg(feedback.c.score).label("score"))
            .group_by(feedback.c.request_id)
            .subquery("fb")
        )
        pairs = (
            sa.select(
                shadow.c.outcome,
                shadow.c.agree,
                shadow.c.student_latency_s,
                shadow.c.teacher_latency_s,
                shadow.c.student_cost_usd,
                shadow.c.student_tokens,
                requests.c.prompt_tokens,
            )
            .select_from(shadow.outerjoin(requests, requests.c.request_id == shadow.c.request_id))
            .where(
                shadow.c.teacher == teacher,
                shadow.c.student == student,
                shadow.c.created >= since,
            )
            .order_by(shadow.c.id.desc())
            .limit(ROW_LIMIT)
        )

        # A request's record names the engine that answered: the base model (and the
        # adapter) when the teacher did, the student when a split sent it there.
        by_teacher = sa.and_(
            requests.c.served_by == "engine",
            sa.or_(
                requests.c.adapter == teacher,
                sa.and_(requests.c.adapter.is_(None), requests.c.model == teacher),
            ),
        )
        by_student = sa.and_(requests.c.served_by == "student", requests.c.model == student)

        def answers(which: sa.ColumnElement[bool]) -> sa.Select[Any]:
            return (
                sa.select(
                    requests.c.status,
                    requests.c.latency_s,
                    requests.c.cost_usd,
                    (requests.c.prompt_tokens + requests.c.completion_tokens).label("tokens"),
                    fb.c.score,
                )
                .select_from(requests.outerjoin(fb, fb.c.request_id == requests.c.request_id))
                .where(which, requests.c.created >= since)
                .order_by(requests.c.id.desc())
                .limit(ROW_LIMIT)
            )

        async with self.engine.connect() as conn:
            p = [dict(r) for r in (await conn.execute(pairs)).mappings().all()]
            t = [dict(r) for r in (await conn.execute(answers(by_teacher))).mappings().all()]
            s = [dict(r) for r in (await conn.execute(answers(by_student))).mappings().all()]
        return StageData(pairs=p, teacher=t, student=s)


async def start_rollout(
    url: str,
    teacher: str,
    student: str,
    steps: list[float],
    *,
    actor: str = "distill",
    reason: str = "published",
) -> Rollout:
    """Start a rollout of a newly published student in shadow (``retort distill run
    --publish --rollout``). A live rollout of the teacher is rolled back first: the new
    student replaces the one it was judging, and earns its way from shadow again."""
    from retort.db.store import PromptStore

    async with PromptStore(url) as log:
        store = RolloutStore(log.engine)
        current = await store.latest(teacher)
        if current is not None and current.status not in machine.FINAL:
            why = f"superseded by a newly published `{student}`"
            await store.apply(*machine.rollback(current, actor=actor, reason=why))
            current = await store.latest(teacher)
        r, event = machine.start(
            teacher, student, steps, current=current, actor=actor, reason=reason
        )
        return await store.create(r, event)
