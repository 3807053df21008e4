"""Rollout administration under ``/admin/students`` (mounted with the other admin handlers,
behind :func:`gateway.guards.admin_guard`):

- ``GET /admin/students/rollouts``: every teacher's latest rollout;
- ``GET /admin/students/{name}/rollout``: the student's rollout, its stage's figures, costs,
  what the policy would decide now, and its events;
- ``POST /admin/students/{name}/rollout/{action}``: ``start``, ``pause``, ``resume``,
  ``promote`` or ``rollback``, with an optional body ``{"teacher", "reason"}`` (``start``
  defaults the teacher to the one the student was distilled from).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post

from gateway.errors import BadRequestError, ConflictError, NotFoundError, ServiceUnavailableError
from gateway.rollout.service import OPERATIONS, RolloutService, find, teacher_of
from gateway.state import Gateway
from retort.rollout import Rollout, RolloutError, RolloutEvent

__all__ = ["ROLLOUT_HANDLERS", "act", "status_for"]


class RolloutAction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    teacher: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    """The teacher (base model or adapter) whose traffic moves; ``start`` defaults to the
    student's own teacher (its manifest)."""
    reason: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    """Recorded with the event."""


def _service(gw: Gateway) -> RolloutService:
    if gw.rollouts is None:
        raise ServiceUnavailableError(
            "Rollouts are off (rollout.enabled, with the prompt log on).",
            code="rollouts_disabled",
        )
    return gw.rollouts


def _json(obj: Any, status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


async def _check_teacher(gw: Gateway, teacher: str) -> None:
    """A teacher is the base model or an adapter (loaded, or in the registry)."""
    routes = gw.routes
    if teacher in (routes.base_name, gw.settings.model.path):
        return
    adapters = routes.adapters
    if adapters is not None and (
        adapters.get(teacher) is not None
        or await asyncio.to_thread(adapters.registry.get, teacher) is not None
    ):
        return
    raise NotFoundError(
        f"`{teacher}` is neither the base model nor an adapter: it cannot be a teacher.",
        param="teacher",
    )


@get("/students/rollouts", summary="Every teacher's latest rollout")
async def list_rollouts(gateway: Gateway) -> Response[bytes]:
    service = _service(gateway)
    current = await service.store.current()
    return _json({"object": "list", "data": [r.to_json() for r in current.values()]})


@get("/students/{name:str}/rollout", summary="A student's rollout: stage, figures, cost, events")
async def rollout_status(
    name: str, gateway: Gateway, teacher: str | None = None
) -> Response[bytes]:
    return _json(await status_for(gateway, name, teacher))


async def status_for(
    gw: Gateway, student: str, teacher: str | None = None, *, events: int = 20
) -> dict[str, Any]:
    """The student's rollout status (404 without one, 409 when it has several teachers')."""
    service = _service(gw)
    try:
        r = await find(service.store, student, teacher)
        return await service.status(r.teacher, events=events)
    except LookupError as exc:
        raise NotFoundError(str(exc), param="name") from exc
    except RolloutError as exc:
        raise ConflictError(str(exc), param="teacher") from exc


@post(
    "/students/{name:str}/rollout/{action:str}",
    status_code=200,
    summary="Start, pause, resume, promote or roll back a student's rollout",
)
async def rollout_action(
    name: str, action: str, request: Request[Any, Any, Any], gateway: Gateway
) -> Response[bytes]:
    _service(gateway)
    if action not in OPERATIONS:
        raise NotFoundError(
            f"Unknown rollout action `{action}`; one of {', '.join(OPERATIONS)}.", param="action"
        )
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw, type=RolloutAction) if raw.strip() else RolloutAction()
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"Invalid body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"The body is not valid JSON: {exc}") from exc
    r, event = await act(gateway, name, action, teacher=body.teacher, reason=body.reason)
    return _json({"rollout": r.to_json(), "event": event.to_json()})


async def act(
    gw: Gateway, student: str, action: str, *, teacher: str | None, reason: str | None
) -> tuple[Rollout, RolloutEvent]:
    """An operator's action on a student's rollout (the admin API's and the console's);
    API errors: 404 unknown student, teacher or rollout; 409 a refused transition."""
    service = _service(gw)
    if action not in OPERATIONS:
        raise NotFoundError(
            f"Unknown rollout action `{action}`; one of {', '.join(OPERATIONS)}.", param="action"
        )
    try:
        if action == "start":
            pool = gw.routes.students
            if pool is None or not pool.registered(student):
                raise NotFoundError(f"No registered student is named `{student}`.", param="name")
            if teacher is None:
                teacher = await asyncio.to_thread(teacher_of, pool.registry, student)
            await _check_teacher(gw, teacher)
        else:
            teacher = (await find(service.store, student, teacher)).teacher
        return await service.operate(action, teacher, student=student, reason=reason)
    except LookupError as exc:
        raise NotFoundError(str(exc), param="name") from exc
    except RolloutError as exc:
        raise ConflictError(str(exc), param="action") from exc


ROLLOUT_HANDLERS = [list_rollouts, rollout_status, rollout_action]
