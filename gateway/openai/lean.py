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

:class:`LeanApp` (the app :func:`gateway.app.create_app` builds) goes one step further for
those routes: it matches their exact path and method before Litestar's router, its exception
middleware and the route's middleware stack, runs the route group's access check itself
(``lean_checks``: a plain function standing for each ASGI middleware between the app and
:class:`LeanRoute`, e.g. :func:`gateway.guards.check_api_key` for
:func:`gateway.guards.api_auth`), and serves the request lean. Whatever fails is answered
by Litestar's own app-level exception handling (the same handlers, hooks and
``before_send``), and a body the strict decoder refuses goes down Litestar's whole path,
replayed, as above. A route whose stack holds anything else, or an app with CORS, CSRF,
compression, allowed hosts or app-level middleware, is never dispatched early.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar
from litestar._asgi.utils import is_valid_host
from litestar.exceptions import LitestarException
from litestar.middleware._internal.exceptions import ExceptionHandlerMiddleware
from litestar.routes import HTTPRoute
from litestar.utils.scope.state import ScopeState

from gateway.openai.sse import JSONBytes, SSEStream
from gateway.state import provide_gateway

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from litestar.handlers.http_handlers import HTTPRouteHandler
    from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

__all__ = ["LeanApp", "LeanRoute", "lean_plan"]

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


_PENDING = "retort_lean_error"
"""``scope["state"]`` key of the exception that :class:`LeanApp` hands to Litestar's handling."""


async def _raise_pending(scope: Scope, receive: Receive, send: Send) -> None:
    raise scope["state"].pop(_PENDING)


class _Dispatch:
    """One route that :class:`LeanApp` serves before Litestar's router."""

    __slots__ = ("checks", "error_app", "exception_handlers", "handler", "path", "plan")

    def __init__(
        self,
        path: str,
        handler: HTTPRouteHandler,
        plan: _Plan,
        checks: list[Callable[[Scope], None]],
    ) -> None:
        self.path = path
        self.handler = handler
        self.plan = plan
        self.checks = checks
        self.exception_handlers = handler.resolve_exception_handlers()
        # Litestar's app-level exception middleware, around a callable that raises the
        # exception the lean path caught: the same handler lookup, logging, hooks, response.
        self.error_app = ExceptionHandlerMiddleware(app=_raise_pending, debug=None)

    async def error(
        self, app: Litestar, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """Answer ``exc`` as Litestar's exception middleware answers it for this route."""
        ScopeState.from_scope(scope).exception_handlers = self.exception_handlers
        scope["state"][_PENDING] = exc
        await self.error_app(scope, receive, app._wrap_send(send, scope))

    async def __call__(self, app: Litestar, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope["headers"]:
            if name == b"host":  # Litestar's router refuses a bad one (400)
                if not is_valid_host(value):
                    await Litestar.__call__(app, scope, receive, send)
                    return
                break
        # What Litestar's router and Litestar.__call__ set.
        scope["app"] = scope["litestar_app"] = app
        scope.setdefault("state", {})
        scope["route_handler"] = self.handler
        scope["path_params"] = {}
        scope["path_template"] = self.path
        try:
            for check in self.checks:
                check(scope)
        except Exception as exc:
            await self.error(app, scope, receive, send, exc)
            return
        plan = self.plan
        body, messages = await _read_body(receive, plan.max_body)
        if body is None:
            await Litestar.__call__(app, scope, _replay(messages, receive), send)
            return
        try:
            data = plan.decode(body)
        except msgspec.DecodeError:  # ValidationError included: Litestar gives the 4xx
            await Litestar.__call__(app, scope, _replay(messages, receive), send)
            return
        try:
            gateway = provide_gateway(app.state)
            if plan.wants_scope:
                response = await plan.fn(data=data, gateway=gateway, scope=scope)
            else:
                response = await plan.fn(data=data, gateway=gateway)
        except Exception as exc:
            await self.error(app, scope, receive, send, exc)
            return
        hooks = app.before_send
        started = False

        async def send_hooked(message: Message) -> None:  # Litestar's _wrap_send, and more
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            for hook in hooks:
                await hook(message, scope)
            await send(message)

        try:
            await response.asgi()(scope, receive, send_hooked)
        except Exception as exc:
            if started:  # as Litestar's exception middleware does
                raise LitestarException("Exception caught after response started") from exc
            await self.error(app, scope, receive, send, exc)


class LeanApp(Litestar):
    """Litestar, with the lean routes (:class:`LeanRoute`) dispatched before its router.

    ``lean_checks`` maps each ASGI middleware that may sit between the app and
    :class:`LeanRoute` on a route to a function doing its check on the scope (raising what
    the middleware raises); a route with any other middleware is left to Litestar.
    """

    __slots__ = ("_lean_checks", "_lean_routes")

    def __init__(
        self,
        *args: Any,
        lean_checks: Mapping[Any, Callable[[Scope], None]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._lean_checks = dict(lean_checks or {})
        self._lean_routes: dict[str, _Dispatch] | None = None
        super().__init__(*args, **kwargs)

    def lean_routes(self) -> dict[str, _Dispatch]:
        """The routes dispatched before the router, by path (worked out once)."""
        if self._lean_routes is None:
            self._lean_routes = {}
            if not (why := self._app_refusal()):
                for route in self.routes:
                    if isinstance(route, HTTPRoute) and "POST" in route.route_handler_map:
                        self._add(route)
            else:
                log.warning("no route is dispatched before Litestar's router: %s", why)
        return self._lean_routes

    def _app_refusal(self) -> str:
        if type(self.asgi_handler) is not ExceptionHandlerMiddleware:
            return "the app wraps its router (CORS, OpenTelemetry)"
        present = [
            name
            for name in ("middleware", "csrf_config", "compression_config", "allowed_hosts")
            if getattr(self, name)
        ]
        return f"the app has {', '.join(present)}" if present else ""

    def _add(self, route: HTTPRoute) -> None:
        handler = route.route_handler_map["POST"][0]
        stack = handler.resolve_middleware()  # innermost first
        if not stack or stack[0] is not LeanRoute or "{" in route.path:
            return
        outer = stack[1:]
        if any(m not in self._lean_checks for m in outer) or handler.cache:
            log.warning(
                "%s is not dispatched before Litestar's router: middleware %s", route.path, outer
            )
            return
        plan = lean_plan(handler)
        if isinstance(plan, str):
            return  # LeanRoute warns once, when it first serves the route
        checks = [self._lean_checks[m] for m in reversed(outer)]  # outermost runs first
        self._lean_routes[route.path] = _Dispatch(route.path, handler, plan, checks)  # type: ignore[index]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            routes = self._lean_routes if self._lean_routes is not None else self.lean_routes()
            route = routes.get(scope["path"])
            if route is not None:
                await route(self, scope, receive, send)
                return
        await super().__call__(scope, receive, send)
