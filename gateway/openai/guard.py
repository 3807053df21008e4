"""The API-key guard of the OpenAI routes (``/v1/*``).

Guards run before the body is parsed, so a request without a valid key gets 401 even
when its body is malformed. The key (never the secret) is left in ``scope["state"]``
for limits, metrics and the prompt log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.openai.serving import KEY_STATE

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler

    from gateway.state import Gateway

__all__ = ["api_guard"]


async def api_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # async on purpose: Litestar runs a sync guard in a worker thread, which cost every
    # request a thread hop (the largest single item in the hot path's profile).
    gw: Gateway = connection.app.state.gateway
    key = gw.auth.authenticate(connection.headers.get("authorization"))
    if key is not None:
        connection.scope.setdefault("state", {})[KEY_STATE] = key
