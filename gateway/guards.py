"""The access rules of the two route groups; :func:`gateway.app.create_app` puts each on its
Litestar ``Router``, never on single handlers.

- :func:`api_auth` (``/v1``, a middleware): with keys configured, a valid key is required
  (401). The key (never the secret) is left in ``scope["state"]`` for limits, metrics and
  the log.
- :func:`admin_guard` (``/admin`` and vLLM's ``/v1/(un)load_lora_adapter``, a guard): with
  admin keys configured, an admin key is required (any other key gets 403); without them,
  only loopback clients are accepted.

Both run before the body is parsed, so a request without a valid key gets 401 even when
its body is malformed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.openai.serving import KEY_STATE
from gateway.requestid import header

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler
    from litestar.types import ASGIApp, Receive, Scope, Send

    from gateway.state import Gateway

__all__ = ["admin_guard", "api_auth", "check_api_key"]

_AUTHORIZATION = b"authorization"


def api_auth(app: ASGIApp) -> ASGIApp:
    """The ``/v1`` API-key check, as a plain ASGI middleware on the route group.

    Not a Litestar guard on purpose: the hot path of every API request. Litestar calls each
    guard with ``copy(route_handler)`` (about 5 % of a request's CPU in the fake-engine
    profile) after building the ``Request``; this reads the header from the scope, and with
    no keys configured costs one attribute test. A refusal raises into Litestar's exception
    handling, so the 401 is the same OpenAI-shaped body a guard gave.
    """

    async def authenticated(scope: Scope, receive: Receive, send: Send) -> None:
        check_api_key(scope)
        await app(scope, receive, send)

    return authenticated


def check_api_key(scope: Scope) -> None:
    """:func:`api_auth`'s check on its own (what :class:`gateway.openai.lean.LeanApp` runs
    for it on the routes it dispatches before Litestar's router)."""
    gw: Gateway = scope["litestar_app"].state.gateway
    auth = gw.auth
    if auth.enabled:
        key = auth.authenticate(header(scope, _AUTHORIZATION))
        scope.setdefault("state", {})[KEY_STATE] = key


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    gw: Gateway = connection.app.state.gateway
    host = connection.client.host if connection.client else None
    gw.auth.authorize_admin(connection.headers.get("authorization"), host)
