"""The console's sessions and CSRF guard.

An admin key is entered once on ``/console/login``; the gateway checks it like ``/admin``
does and keeps only the key's *id* in a server-side session. The browser gets a random
session id in an HttpOnly, ``SameSite=Strict`` cookie scoped to ``/console``; the key itself
is never stored, logged or written into a page. Each session has its own CSRF token, which
every state-changing form sends back (``csrf_token``) or htmx sends as ``X-CSRF-Token``.

Without admin keys configured the console is served to loopback clients only (as ``/admin``)
and needs no login; the session is then anonymous and exists for the CSRF token.

A request carrying ``Authorization: Bearer <admin key>`` is let through by ``/admin``'s own
guard instead (scripts, ``curl``); browsers never add that header by themselves, so such a
request needs no CSRF token.

Sessions live in the gateway process: a restart means logging in again, and several
replicas need sticky sessions for the console.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.errors import APIError
from gateway.guards import admin_guard

if TYPE_CHECKING:
    from litestar import Request
    from litestar.connection import ASGIConnection
    from litestar.datastructures import FormMultiDict
    from litestar.handlers.base import BaseRouteHandler

    from gateway.state import Gateway

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "CSRFError",
    "LoginRequiredError",
    "Session",
    "Sessions",
    "console_guard",
    "csrf_form",
    "session_of",
]

SESSION_COOKIE = "retort_console"
LOGIN_COOKIE = "retort_console_login"
"""The login form's own CSRF token (double submit: cookie and form field must match)."""
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 8 * 3600.0
"""A session ends after this long without a request."""
MAX_SESSIONS = 1000
"""Beyond this many sessions the least recently used one is dropped."""
COOKIE_PATH = "/console"


class LoginRequiredError(APIError):
    """401: the console needs an admin key (rendered as the login page)."""

    status_code = 401
    type = "authentication_error"
    code = "login_required"

    def __init__(self, message: str = "Log in with an admin API key.") -> None:
        super().__init__(message)


class CSRFError(APIError):
    """403: a state-changing form without its session's CSRF token."""

    status_code = 403
    type = "permission_error"
    code = "csrf_failed"

    def __init__(self, message: str = "Missing or wrong CSRF token; reload the page.") -> None:
        super().__init__(message)


@dataclass
class Session:
    key_id: str | None
    """The admin key's id (``None``: anonymous loopback session, no admin keys configured)."""
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)


class Sessions:
    """Server-side sessions, keyed by a digest of the random id the cookie holds."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._by_digest: dict[bytes, Session] = {}

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()

    def create(self, key_id: str | None) -> tuple[str, Session]:
        """A new session; returns the cookie value (shown to nobody else) and the session."""
        self._expire()
        while len(self._by_digest) >= self.max_sessions:
            oldest = min(self._by_digest, key=lambda d: self._by_digest[d].seen)
            del self._by_digest[oldest]
        token = secrets.token_urlsafe(32)
        session = Session(key_id=key_id)
        self._by_digest[self._digest(token)] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        digest = self._digest(token)
        session = self._by_digest.get(digest)
        if session is None:
            return None
        now = time.time()
        if now - session.seen > self.ttl_s:
            del self._by_digest[digest]
            return None
        session.seen = now
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(self._digest(token), None)

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        for digest in [d for d, s in self._by_digest.items() if s.seen < cutoff]:
            del self._by_digest[digest]

    def __len__(self) -> int:
        return len(self._by_digest)


def console_guard(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Admit a request to the console, or raise 401 (login) / 403.

    Sets ``connection.state.console_session`` (``None`` for a bearer-key request) and, when
    an anonymous loopback session was just made, ``console_new_session`` (its cookie value).
    """
    gw: Gateway = connection.app.state.gateway
    sessions: Sessions = connection.app.state.console.sessions
    connection.state.console_new_session = None
    if connection.headers.get("authorization"):
        admin_guard(connection, handler)  # exactly /admin's rule: 401, 403, or admitted
        connection.state.console_session = None
        return
    session = sessions.get(connection.cookies.get(SESSION_COOKIE))
    if gw.auth.has_admin:
        if session is None or session.key_id is None:
            raise LoginRequiredError()
    else:
        admin_guard(connection, handler)  # loopback only (403 otherwise)
        if session is None:
            token, session = sessions.create(key_id=None)
            connection.state.console_new_session = token
    connection.state.console_session = session


def session_of(request: Request[Any, Any, Any]) -> Session | None:
    """The session :func:`console_guard` admitted the request with (``None``: bearer key)."""
    return getattr(request.state, "console_session", None)


async def csrf_form(request: Request[Any, Any, Any]) -> FormMultiDict:
    """The request's form, after checking its CSRF token against the session's (403)."""
    form = await request.form()
    session = session_of(request)
    if session is None and request.headers.get("authorization"):
        return form  # admitted by an admin bearer key: not a browser's ambient credential
    if session is None:
        raise CSRFError()
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not isinstance(sent, str) or not hmac.compare_digest(
        sent.encode("utf-8", "surrogateescape"), session.csrf.encode()
    ):
        raise CSRFError()
    return form
