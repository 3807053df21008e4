"""What every console page shares: rendering with the session's CSRF token, the error page,
number and time formatting for the templates."""

from __future__ import annotations

import logging
import math
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Response
from litestar.datastructures import Cookie
from litestar.exceptions import HTTPException
from litestar.response import Template

from gateway.console.session import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_TTL_S,
    LoginRequiredError,
    session_of,
)
from gateway.errors import APIError, to_api_error

if TYPE_CHECKING:
    from litestar import Request

    from gateway.state import Gateway
    from retort.db.store import PromptStore

__all__ = [
    "TEMPLATES_DIR",
    "console_exception_handler",
    "error_json",
    "fmt_cost",
    "fmt_num",
    "fmt_seconds",
    "fmt_time",
    "gateway_of",
    "login_cookie",
    "render",
    "session_cookie",
    "store_of",
]

log = logging.getLogger("retort.console")

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")


def gateway_of(request: Request[Any, Any, Any]) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def store_of(request: Request[Any, Any, Any]) -> PromptStore | None:
    """The prompt log's store, or ``None`` when the log is off (or not open yet)."""
    plog = gateway_of(request).promptlog
    return plog.store if plog is not None and plog.enabled else None


def session_cookie(request: Request[Any, Any, Any], value: str, max_age: int | None) -> Cookie:
    return Cookie(
        key=SESSION_COOKIE,
        value=value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=max_age,
    )


def login_cookie(request: Request[Any, Any, Any], value: str) -> Cookie:
    """The login form's double-submit token."""
    return Cookie(
        key=LOGIN_COOKIE,
        value=value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=3600,
    )


def _base_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    session = session_of(request)
    return {
        "csrf_token": session.csrf if session is not None else "",
        "key_id": session.key_id if session is not None else None,
        "logged_in": session is not None and session.key_id is not None,
        "path": request.url.path,
        "hx": request.headers.get("hx-request") == "true",
    }


def render(
    request: Request[Any, Any, Any], template: str, status_code: int = 200, **context: Any
) -> Template:
    """The template with the shared context; sets the cookie of a session just made."""
    cookies = []
    new = getattr(request.state, "console_new_session", None)
    if new:
        cookies.append(session_cookie(request, new, int(SESSION_TTL_S)))
    return Template(
        template_name=template,
        context={**_base_context(request), **context},
        status_code=status_code,
        cookies=cookies,
        headers={"Cache-Control": "no-store"},
    )


def error_json(exc: APIError) -> str:
    """The error as the API returns it (``{"error": {...}}``), pretty-printed."""
    body = {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }
    return msgspec.json.format(msgspec.json.encode(body), indent=2).decode()


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, HTTPException) and not isinstance(exc, APIError):
        err = APIError(str(exc.detail))  # Litestar's own: 404, 405, 413, a bad form...
        err.status_code = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "api_error"
        return err
    return to_api_error(exc)


def console_exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """Console errors as HTML pages: 401 shows the login form, the rest an error page."""
    err = _as_api_error(exc)
    if err.status_code >= 500:
        log.error("console: %s %s failed", request.method, request.url.path, exc_info=exc)
    engine = request.app.template_engine
    assert engine is not None
    ctx = _base_context(request)
    cookies = []
    if isinstance(exc, LoginRequiredError):
        token = secrets.token_urlsafe(32)
        cookies.append(login_cookie(request, token))
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        ctx.update(error=None, next=nxt, login_csrf=token, has_admin=True)
        html = engine.get_template("login.html").render(
            **ctx, message="Log in with an admin API key to use the console."
        )
    else:
        html = engine.get_template("error.html").render(
            **ctx, status=err.status_code, message=err.message, detail=error_json(err)
        )
    headers = dict(getattr(exc, "headers", None) or {})
    headers.pop("WWW-Authenticate", None)  # no browser Basic/Bearer prompt over the page
    headers["Cache-Control"] = "no-store"
    return Response(
        html,
        status_code=err.status_code,
        media_type=MediaType.HTML,
        headers=headers,
        cookies=cookies,
    )


# -- formatting (template filters) ---------------------------------------------------------


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def fmt_seconds(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def fmt_cost(v: float | None) -> str:
    if v is None:
        return "–"
    return f"${v:.6f}" if v < 0.01 else f"${v:.4f}"


def fmt_num(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:,.{digits}f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


FILTERS = {
    "time": fmt_time,
    "age": fmt_age,
    "secs": fmt_seconds,
    "cost": fmt_cost,
    "num": fmt_num,
    "bytes": fmt_bytes,
}
