"""The guards of the two route groups; :func:`gateway.app.create_app` puts each on its
Litestar ``Router``, never on single handlers.

- :func:`api_guard` (``/v1``): with keys configured, a valid key is required (401). The
  key (never the secret) is left in ``scope["state"]`` for limits, metrics and the log.
- :func:`admin_guard` (``/admin`` and vLLM's ``/v1/(un)load_lora_adapter``): with admin
  keys configured, an admin key is required (any other key gets 403); without them, only
  loopback clients are accepted.

Guards run before the body is parsed, so a request without a valid key gets 401 even
when its body is malformed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.openai.serving import KEY_STATE

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler

    from gateway.state import Gateway

__all__ = ["admin_guard", "api_guard"]


async def api_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # async on purpose: Litestar runs a sync guard in a worker thread, which cost every
    # request a thread hop (the largest single item in the hot path's profile).
    gw: Gateway = connection.app.state.gateway
    key = gw.auth.authenticate(connection.headers.get("authorization"))
    if key is not None:
        connection.scope.setdefault("state", {})[KEY_STATE] = key


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    gw: Gateway = connection.app.state.gateway
    host = connection.client.host if connection.client else None
    gw.auth.authorize_admin(connection.headers.get("authorization"), host)
