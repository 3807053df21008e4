"""The lean path of the hot POST routes (chat and text completions): a route middleware that
reads the JSON body from ASGI ``receive``, decodes it with msgspec straight into the
handler's ``data`` struct and calls the handler, without Litestar's ``Request``, kwargs
model, signature model and dependency injection (about half of a request's in-process CPU
with the fake engine, BENCHMARKS section 10c).

Only a plain request takes it: a body that arrives whole, within
``server.max_body_bytes``, and that msgspec's strict decoder turns into the struct. Any
other request (a body too large, a client gone while it uploads, malformed JSON, a wrong
type, or a value that only Litestar's lax conversion accepts, such as ``"16"`` for an
integer) goes down Litestar's own path with the body replayed, so what is accepted, and
every 4xx, is exactly Litestar's. (A field of a type that needs one of Litestar's type
decoders fails the strict decode, so it goes that way too.) The same handler function runs
on both paths.

A handler is served lean only if the lean path calls it exactly as Litestar would: its
parameters are ``data`` (a msgspec struct) and ``gateway`` (provided by
:func:`~gateway.state.provide_gateway`), and optionally ``scope``; no guards, hooks,
layered response headers or cookies, DTOs or cache; a response of its own
(declared ``-> JSONBytes | SSEStream``, :mod:`gateway.openai.sse`). Anything
else is served by Litestar, and a warning says why once.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.openai.sse import JSONBytes, SSEStream
from gateway.state import provide_gateway

if TYPE_CHECKING:
    from collections.abc import Callable

    from litestar.handlers.http_handlers import HTTPRouteHandler
    from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

__all__ = ["LeanRoute", "lean_plan"]

log = logging.getLogger("retort.lean")

_PARAMS = frozenset({"data", "gateway", "scope"})


class _Plan:
    """How to serve one handler lean."""

    __slots__ = ("decode", "fn", "max_body", "wants_scope")

    def __init__(
        self, decode: Callable[[bytes], Any], fn: Any, max_body: float, wants_scope: bool
    ) -> None:
        self.decode = decode
        self.fn = fn
        self.max_body = max_body
        self.wants_scope = wants_scope


def lean_plan(handler: HTTPRouteHandler) -> _Plan | str:
    """The plan to serve ``handler`` lean, or why it cannot be (then Litestar serves it)."""
    params = handler.parsed_fn_signature.parameters
    if not {"data", "gateway"} <= set(params) <= _PARAMS:
        return f"parameters {sorted(params)}: data, gateway and optionally scope are served lean"
    data_type = params["data"].annotation
    if not (isinstance(data_type, type) and issubclass(data_type, msgspec.Struct)):
        return f"data is a {data_type!r}, not a msgspec struct"
    deps = handler.resolve_dependencies()
    if getattr(deps.get("gateway"), "dependency", None) is not provide_gateway:
        return "gateway is not provided by gateway.state.provide_gateway"
    layered = {
        "guards": handler.resolve_guards(),
        "before_request": handler.resolve_before_request(),
        "after_request": [layer for layer in handler.ownership_layers if layer.after_request],
        "after_response": handler.resolve_after_response(),
        "response_headers": handler.resolve_response_headers(),
        "response_cookies": handler.resolve_response_cookies(),
        "data DTO": handler.resolve_data_dto(),
        "return DTO": handler.resolve_return_dto(),
        "background": handler.background,
        "cache": handler.cache,
    }
    if present := [name for name, value in layered.items() if value]:
        return f"it has {', '.join(present)}"
    if handler.status_code != 200:
        return f"status code {handler.status_code}"
    if not handler.parsed_fn_signature.return_type.is_subclass_of((JSONBytes, SSEStream)):
        return "it does not return a JSONBytes or an SSEStream"
    return _Plan(
        msgspec.json.Decoder(data_type).decode,
        handler.fn,
        handler.resolve_request_max_body_size() or math.inf,
        "scope" in params,
    )


def _replay(messages: list[ReceiveMessage], receive: Receive) -> Receive:
    """``receive`` that gives ``messages`` back first (what the lean path already read)."""
    pending = list(messages)

    async def replay() -> Any:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _read_body(receive: Receive, limit: float) -> tuple[bytes | None, list[ReceiveMessage]]:
    """The whole body, or ``None`` when the client left or it passed ``limit``; with the
    messages read, for a replay."""
    message = await receive()
    messages: list[ReceiveMessage] = [message]
    if message["type"] != "http.request":
        return None, messages
    body = message.get("body", b"")
    if len(body) > limit:
        return None, messages
    if not message.get("more_body"):
        return body, messages
    size = len(body)  # the body came in pieces: gather them
    while message.get("more_body"):
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        size += len(message.get("body", b""))
        if size > limit:
            return None, messages
    return b"".join(m.get("body", b"") for m in messages), messages  # type: ignore[misc]


class LeanRoute:
    """The route middleware (``@post(..., middleware=[LeanRoute])``)."""

    __slots__ = ("app", "plans")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        """Litestar's own path for the route."""
        self.plans: dict[int, _Plan | None] = {}
        """Per handler (by id): its plan, or ``None`` when Litestar serves it."""

    def _plan(self, handler: HTTPRouteHandler) -> _Plan | None:
        plan = lean_plan(handler)
        if isinstance(plan, str):
            log.warning("%s is served by Litestar's path, not the lean one: %s", handler, plan)
            self.plans[id(handler)] = None
            return None
        self.plans[id(handler)] = plan
        return plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler: Any = scope["route_handler"]
        try:
            plan = self.plans[id(handler)]
        except KeyError:
            plan = self._plan(handler)
        if plan is None:
            await self.app(scope, receive, send)
            return
        body, messages = await _read_body(receive, plan.max_body)
        if body is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        try:
            data = plan.decode(body)
        except msgspec.DecodeError:  # ValidationError included: Litestar gives the 4xx
            await self.app(scope, _replay(messages, receive), send)
            return
        gateway = provide_gateway(scope["litestar_app"].state)
        if plan.wants_scope:
            response = await plan.fn(data=data, gateway=gateway, scope=scope)
        else:
            response = await plan.fn(data=data, gateway=gateway)
        await response.asgi()(scope, receive, send)
