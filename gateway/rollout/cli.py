"""``retort students rollout start|pause|resume|promote|rollback|status``.

The commands work on the database the gateways share (``promptlog.url`` of ``--config``, or
``--url``): every replica picks a change up within ``rollout.refresh_s``, and no gateway
needs to be running. The same actions are ``POST /admin/students/{name}/rollout/{action}``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.rollout.service import find, operate, status_of, teacher_of
from retort.rollout import RolloutError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.settings import Settings
    from retort.db.rollouts import RolloutStore

__all__ = ["rollout_app", "students_app"]

students_app = typer.Typer(help="Students: staged rollouts.", no_args_is_help=True)
rollout_app = typer.Typer(
    help="Move a teacher's traffic to a student: shadow -> canary -> ramp -> full.",
    no_args_is_help=True,
)
students_app.add_typer(rollout_app, name="rollout")

Config = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (retort.yaml).")]
Url = Annotated[
    str | None, typer.Option(help="Database URL; the configured prompt log when unset.")
]
Teacher = Annotated[
    str | None,
    typer.Option(help="The teacher (base model or adapter); the student's own by default."),
]
Reason = Annotated[str | None, typer.Option(help="Recorded with the event.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _run(
    config: Path | None, url: str | None, work: Callable[[Settings, RolloutStore], Awaitable[Any]]
) -> Any:
    from gateway.settings import load_settings
    from retort.db.rollouts import RolloutStore
    from retort.db.store import PromptStore
    from retort.settings import SettingsError, default_url

    try:
        settings = load_settings(config)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    async def main() -> Any:
        store = PromptStore(url or settings.promptlog.url or default_url(settings.home_path))
        await store.open()
        try:
            return await work(settings, RolloutStore(store.engine))
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except (LookupError, RolloutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _act(action: str, student: str, teacher: str | None, reason: str | None, **kw: Any) -> None:
    config, url = kw.pop("config"), kw.pop("url")

    async def work(settings: Settings, store: RolloutStore) -> str:
        who = teacher
        if action == "start":
            from gateway.students import StudentRegistry

            registry = StudentRegistry(settings.students_path)
            known = await asyncio.to_thread(teacher_of, registry, student)
            who = who or known
            r, event = await operate(
                store,
                "start",
                who,
                student=student,
                steps=list(settings.rollout.policy.steps),
                reason=reason,
            )
        else:
            who = (await find(store, student, who)).teacher
            r, event = await operate(store, action, who, student=student, reason=reason)
        moved = f"{event.from_stage} -> {r.stage}, share {r.share:g}"
        return f"{r.teacher} -> {r.student}: {event.action} ({moved})"

    typer.echo(_run(config, url, work))


_ACTIONS = {
    "start": "Start a rollout of STUDENT in shadow (or resume its paused one).",
    "pause": "Keep the split where it is; the policy stops advancing it (it still rolls back).",
    "resume": "Hand a paused rollout back to the policy.",
    "promote": "Move to the next stage now.",
    "rollback": "Send all of the teacher's traffic back to it, at once.",
}


def _action_command(action: str, doc: str) -> Callable[..., None]:
    def command(
        student: str,
        teacher: Teacher = None,
        reason: Reason = None,
        config: Config = None,
        url: Url = None,
    ) -> None:
        _act(action, student, teacher, reason, config=config, url=url)

    command.__doc__ = doc
    command.__name__ = action
    return command


for _action, _doc in _ACTIONS.items():
    rollout_app.command(_action)(_action_command(_action, _doc))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


@rollout_app.command("status")
def status(
    student: Annotated[
        str | None, typer.Argument(help="One student; all rollouts when unset.")
    ] = None,
    teacher: Teacher = None,
    as_json: AsJson = False,
    config: Config = None,
    url: Url = None,
) -> None:
    """Stage, split, figures, cost per 1k tokens and projected saving, and recent events."""

    async def work(settings: Settings, store: RolloutStore) -> Any:
        if student is None:
            return [r.to_json() for r in (await store.current()).values()]
        r = await find(store, student, teacher)
        override = r.teacher in settings.students.traffic
        return await status_of(store, r, settings.rollout.policy, override=override)

    out = _run(config, url, work)
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    if isinstance(out, list):
        if not out:
            typer.echo("no rollouts")
        for r in out:
            typer.echo(
                f"{r['teacher']} -> {r['student']}: {r['stage']} ({r['status']}), "
                f"share {r['share']:g}; {r['reason'] or ''}"
            )
        return
    r, f, cost = out["rollout"], out["figures"], out["cost"]
    saving = cost["projected_saving_ratio"]
    lines = [
        f"{r['teacher']} -> {r['student']}: {r['stage']} ({r['status']}), share {r['share']:g}"
        + (" [students.traffic overrides this split]" if out["override"] else ""),
        f"  stage figures: {f['pairs']} pairs, agreement {_fmt(f['agreement'])}; "
        f"p95 {_fmt(f['student_p95_s'])} s vs teacher {_fmt(f['teacher_p95_s'])} s; "
        f"errors {f['student_errors']}/{f['student_answers']} vs "
        f"{f['teacher_errors']}/{f['teacher_answers']}; feedback "
        f"{_fmt(f['student_score'])} ({f['student_rated']}) vs "
        f"{_fmt(f['teacher_score'])} ({f['teacher_rated']})",
        f"  cost per 1k tokens: teacher ${_fmt(cost['teacher_usd_per_1k_tokens'], '.6f')}, "
        f"student ${_fmt(cost['student_usd_per_1k_tokens'], '.6f')}; projected saving at "
        f"share {cost['at_share']:g}: {_fmt(None if saving is None else 100 * saving, '.1f')}%",
    ]
    if out["next"] is not None:
        lines.append(f"  policy now: {out['next']['action']} ({out['next']['reason']})")
    lines.append("  events:")
    lines += [
        f"    {e['action']:<8} by {e['actor']:<8} {e['from_stage']} -> {e['to_stage']} "
        f"(share {e['share']:g}): {e['reason']}"
        for e in out["events"]
    ]
    typer.echo("\n".join(lines))
