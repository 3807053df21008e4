"""The Retort console: a web UI at ``/console``, served by the gateway itself.

Server-rendered Jinja pages (Litestar's template support) with htmx for partial updates;
htmx is vendored (``static/htmx.min.js``, 2.0.11, and its license), so there is no
JavaScript build step. Admin-guarded like ``/admin`` (see :mod:`gateway.console.session`).

Pages: overview (rates over the last hour), traffic (the prompt log) with each request's
page and rating, the rating queue, adapters, students and distillation runs.

``create_app`` wires it with :func:`console_router`, :func:`template_config` and
:func:`console_lifespan`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from gateway.console.login import LOGIN_HANDLERS, LOGOUT_HANDLERS
from gateway.console.manage import MANAGE_HANDLERS
from gateway.console.overview import Sampler
from gateway.console.rollout import ROLLOUT_HANDLERS
from gateway.console.session import Sessions, console_guard
from gateway.console.traffic import TRAFFIC_HANDLERS
from gateway.console.views import FILTERS, STATIC_DIR, TEMPLATES_DIR, console_exception_handler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar import Litestar

__all__ = ["ConsoleState", "console_lifespan", "console_router", "template_config"]


@dataclass
class ConsoleState:
    sessions: Sessions
    sampler: Sampler


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(env))


def console_router() -> Router:
    """``/console`` (guarded pages and actions), its login, and its static files."""
    pages = Router(
        path="/",
        route_handlers=[
            *TRAFFIC_HANDLERS,
            *MANAGE_HANDLERS,
            *ROLLOUT_HANDLERS,
            *LOGOUT_HANDLERS,
        ],
        guards=[console_guard],
    )
    static = create_static_files_router(
        path="/static",
        directories=[STATIC_DIR],
        name="console:static",
        include_in_schema=False,
        cache_control=None,
    )
    return Router(
        path="/console",
        route_handlers=[pages, *LOGIN_HANDLERS, static],
        exception_handlers={Exception: console_exception_handler},
        include_in_schema=False,
    )


@contextlib.asynccontextmanager
async def console_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Sessions and the overview's sampler; runs after the gateway's lifespan (its metrics)."""
    sampler = Sampler(app.state.gateway.metrics)
    app.state.console = ConsoleState(sessions=Sessions(), sampler=sampler)
    task = asyncio.create_task(sampler.run(), name="console-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
