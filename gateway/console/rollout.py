"""A student's rollout on its console page: stage, split, the stage's figures, cost and
projected saving, what the policy would decide now, the latest events, and the operator's
actions (start, pause, resume, promote, rollback), through the same code as
``/admin/students/{name}/rollout``."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.response import Redirect, Template

from gateway.console.session import csrf_form
from gateway.console.views import error_json, gateway_of, render
from gateway.errors import APIError, NotFoundError
from gateway.rollout.admin import act, status_for

__all__ = ["ROLLOUT_HANDLERS", "rollout_view"]

EVENTS_SHOWN = 10


async def rollout_view(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """What the panel shows: ``status`` (the admin API's), or why there is none."""
    gw = gateway_of(request)
    if gw.rollouts is None:
        return {"unavailable": "Rollouts are off (rollout.enabled, with the prompt log on)."}
    try:
        return {"status": await status_for(gw, name, events=EVENTS_SHOWN)}
    except NotFoundError:
        return {"status": None}
    except APIError as exc:
        return {"unavailable": exc.message}


@post(
    "/students/{name:str}/rollout/{action:str}",
    name="console:student-rollout",
    status_code=200,
)
async def rollout_action(
    request: Request[Any, Any, Any], name: str, action: str
) -> Template | Redirect:
    form = await csrf_form(request)
    reason = str(form.get("reason") or "").strip() or None
    teacher = str(form.get("teacher") or "").strip() or None
    context: dict[str, Any] = {}
    status_code = 200
    try:
        r, event = await act(gateway_of(request), name, action, teacher=teacher, reason=reason)
        context["rollout_message"] = (
            f"{event.action}: {event.from_stage} -> {r.stage} (share {r.share:g})."
        )
    except APIError as exc:
        status_code = exc.status_code
        context["rollout_error"] = error_json(exc)
        context["rollout_error_status"] = exc.status_code
    if request.headers.get("hx-request") != "true":
        return Redirect(f"/console/students/{name}", status_code=303)
    return render(
        request,
        "rollout_panel.html",
        status_code=status_code,
        name=name,
        rollout=await rollout_view(request, name),
        **context,
    )


ROLLOUT_HANDLERS = [rollout_action]
