"""``/console/login`` and ``/console/logout``.

The login form is protected by its own double-submit token (a cookie and a form field that
must match), since there is no session yet. A wrong key gets the form again with 401; the
key typed is never written back into the page.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING, Any

from litestar import Request, get, post
from litestar.datastructures import Cookie
from litestar.response import Redirect, Template

from gateway.console.session import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_TTL_S,
    CSRFError,
    csrf_form,
)
from gateway.console.views import gateway_of, login_cookie, render, session_cookie

if TYPE_CHECKING:
    from gateway.console.session import Sessions

__all__ = ["LOGIN_HANDLERS", "LOGOUT_HANDLERS"]

MAX_KEY_CHARS = 512


def _safe_next(value: Any) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    text = str(value or "")
    if text.startswith("/console") and not text.startswith("//") and "\\" not in text:
        return text
    return "/console/"


def _login_form(
    request: Request[Any, Any, Any],
    *,
    status_code: int = 200,
    error: str | None = None,
    next_path: Any = None,
) -> Template:
    token = secrets.token_urlsafe(32)
    page = render(
        request,
        "login.html",
        status_code=status_code,
        login_csrf=token,
        error=error,
        message=None,
        next=_safe_next(next_path or request.query_params.get("next")),
        has_admin=gateway_of(request).auth.has_admin,
    )
    page.cookies.append(login_cookie(request, token))
    return page


@get("/login", name="console:login")
async def login_page(request: Request[Any, Any, Any]) -> Template | Redirect:
    if not gateway_of(request).auth.has_admin:
        return Redirect("/console/", status_code=303)  # no keys: loopback needs no login
    return _login_form(request)


@post("/login", name="console:login-post", status_code=303)
async def login(request: Request[Any, Any, Any]) -> Template | Redirect:
    form = await request.form()
    cookie = request.cookies.get(LOGIN_COOKIE) or ""
    sent = str(form.get("login_csrf") or "")
    if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
        raise CSRFError("The login form expired; reload the page and try again.")
    gw = gateway_of(request)
    if not gw.auth.has_admin:
        return Redirect("/console/", status_code=303)
    key = str(form.get("key") or "").strip()
    info = gw.auth.check(f"Bearer {key}") if 0 < len(key) <= MAX_KEY_CHARS else None
    if info is None:
        return _login_form(
            request,
            status_code=401,
            error="That is not a valid API key.",
            next_path=form.get("next"),
        )
    if not info.admin:
        return _login_form(
            request,
            status_code=403,
            error="That key is not an admin key.",
            next_path=form.get("next"),
        )
    sessions: Sessions = request.app.state.console.sessions
    sessions.drop(request.cookies.get(SESSION_COOKIE))
    token, _ = sessions.create(key_id=info.id)
    return Redirect(
        _safe_next(form.get("next")),
        status_code=303,
        cookies=[
            session_cookie(request, token, int(SESSION_TTL_S)),
            Cookie(key=LOGIN_COOKIE, value="", path=COOKIE_PATH, max_age=0, expires=0),
        ],
    )


@post("/logout", name="console:logout", status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Redirect:
    await csrf_form(request)
    sessions: Sessions = request.app.state.console.sessions
    sessions.drop(request.cookies.get(SESSION_COOKIE))
    target = "/console/login" if gateway_of(request).auth.has_admin else "/console/"
    return Redirect(
        target,
        status_code=303,
        cookies=[Cookie(key=SESSION_COOKIE, value="", path=COOKIE_PATH, max_age=0, expires=0)],
    )


LOGIN_HANDLERS = [login_page, login]
"""Open: the login form and its post."""
LOGOUT_HANDLERS = [logout]
"""Behind the console guard (the pages router)."""
