"""``x-request-id``: reuse the client's, or make one; every response carries it. Also
:func:`header`, one header read straight from the ASGI scope."""

from __future__ import annotations

import os
import re
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litestar.types import Message, Scope

__all__ = ["add_request_id_header", "header", "new_request_id", "request_id"]

_HEADER = b"x-request-id"
_SAFE = re.compile(r"^[\x21-\x7e]{1,128}$")


_BATCH = 128
"""Ids made from one ``os.urandom`` call (one system call instead of one per request)."""
_ids: deque[str] = deque()


def _refill() -> None:
    raw = bytearray(os.urandom(16 * _BATCH))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    text = raw.hex()
    _ids.extend(text[i : i + 32] for i in range(0, len(text), 32))


def new_request_id() -> str:
    """A new random (version 4) UUID as 32 hex digits: ``uuid.uuid4().hex``, the same bits
    from the same source (``os.urandom``), read for many ids at once and handed out once
    each (``deque.popleft`` is atomic, so threads never share one; a forked child drops
    its parent's)."""
    while True:
        try:
            return _ids.popleft()
        except IndexError:
            _refill()


os.register_at_fork(after_in_child=_ids.clear)


def header(scope: Scope, name: str | bytes) -> str | None:
    """The first value of header ``name`` (lower case) read from the ASGI scope, decoded
    as latin-1 as Litestar's ``Request.headers`` does; ``None`` when absent. For the hot
    path, which builds no ``Request``."""
    raw = name.encode("latin-1") if isinstance(name, str) else name
    for key, value in scope.get("headers", ()):
        if key == raw:
            return value.decode("latin-1")
    return None


def request_id(scope: Scope) -> str:
    """The request's id, taken from ``x-request-id`` when it is sane, else a new uuid4
    (then ``scope["state"]["request_id_generated"]`` is true: the id is unique)."""
    state = scope.setdefault("state", {})
    rid: str | None = state.get("request_id")
    if rid is None:
        candidate = header(scope, _HEADER)
        if candidate is not None and _SAFE.match(candidate := candidate.strip()):
            rid = candidate
        if rid is None:
            rid = new_request_id()
            state["request_id_generated"] = True
        state["request_id"] = rid
    return rid


async def add_request_id_header(message: Message, scope: Scope) -> None:
    """Litestar ``before_send`` hook: runs for every response, errors and 404s included."""
    if message["type"] == "http.response.start":
        headers = list(message.get("headers") or [])
        headers.append((_HEADER, request_id(scope).encode("latin-1")))
        message["headers"] = headers
