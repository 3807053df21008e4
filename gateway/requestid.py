"""``x-request-id``: reuse the client's, or make one; every response carries it."""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litestar.types import Message, Scope

__all__ = ["add_request_id_header", "request_id"]

_HEADER = b"x-request-id"
_SAFE = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(scope: Scope) -> str:
    """The request's id, taken from ``x-request-id`` when it is sane, else a new uuid4
    (then ``scope["state"]["request_id_generated"]`` is true: the id is unique)."""
    state = scope.setdefault("state", {})
    rid: str | None = state.get("request_id")
    if rid is None:
        for key, value in scope.get("headers", ()):
            if key == _HEADER:
                candidate = value.decode("latin-1").strip()
                if _SAFE.match(candidate):
                    rid = candidate
                break
        if rid is None:
            rid = uuid.uuid4().hex
            state["request_id_generated"] = True
        state["request_id"] = rid
    return rid


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """Litestar ``before_send`` hook: runs for every response, errors and 404s included."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers") or [])
        headers.append((_HEADER, request_id(scope).encode("latin-1")))
        message["headers"] = headers
