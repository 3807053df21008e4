"""The lean path of the hot POST routes (``gateway.openai.lean``), driven through the real
app's ASGI callable: which requests take it, that they get what Litestar's path gives, and
that everything else goes down Litestar's path with the body intact.

Which path served a request is read from Litestar's own connection state: its ``Request``
caches the body there, and the lean path builds no ``Request``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar, Response, post
from litestar.datastructures import ResponseHeader, State
from litestar.di import Provide
from litestar.testing import AsyncTestClient
from litestar.types import Empty, Scope
from litestar.utils.scope.state import ScopeState

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.openai.lean import LeanApp, LeanRoute, lean_plan
from gateway.openai.protocol import ChatCompletionRequest
from gateway.openai.sse import JSONBytes, SSEStream
from gateway.settings import EngineSettings, ServerSettings, Settings
from gateway.state import Gateway, provide_gateway
from tests.openai_schema import assert_valid

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}
MAX_BODY = 4096


class Served:
    """One request driven through the app: what was sent back, and which path served it."""

    def __init__(self, scope: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self.scope = scope
        self.messages = messages

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def lean(self) -> bool:
        return ScopeState.from_scope(self.scope).body is Empty  # type: ignore[arg-type]

    @property
    def early(self) -> bool:
        """Dispatched before Litestar's router (:func:`_mark_routed`)."""
        return not self.scope["state"].get("routed")


def _mark_routed(app: Litestar) -> None:
    """Mark in ``scope["state"]`` each request that Litestar's router sees."""
    outer: Any = app.asgi_handler  # the app's exception middleware, around the router
    router = outer.app
    if getattr(router, "marks", False):
        return

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["routed"] = True
        await router(scope, receive, send)

    routed.marks = True  # type: ignore[attr-defined]
    outer.app = routed


async def serve(
    app: Litestar,
    path: str,
    pieces: list[bytes],
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    send_wait: asyncio.Event | None = None,
    disconnect_after_body: bool = False,
    root_path: str = "",
    host: bytes = b"test",
) -> Served:
    """POST ``pieces`` (one ``http.request`` message each) to ``path``."""
    _mark_routed(app)
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": root_path, "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80),
        "headers": [(b"host", host), (b"content-type", b"application/json"),
                    (b"x-request-id", b"lean-test"), *(headers or [])],
        "state": {},
    }  # fmt: skip
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]
    if disconnect_after_body:  # the client leaves before the rest of the body
        incoming[-1]["more_body"] = True
        incoming.append({"type": "http.disconnect"})
    done = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        if incoming:
            return incoming.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if send_wait is not None and message["type"] == "http.response.body":
            await send_wait.wait()
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[arg-type]
    return Served(scope, sent)


def _app(tmp_path: Path, **server: Any) -> Litestar:
    settings = Settings(
        home=str(tmp_path / "home"),
        engine=EngineSettings(kind="fake", max_model_len=64),
        server=ServerSettings(max_body_bytes=MAX_BODY, **server),
    )
    return create_app(settings, engine=FakeEngine(model_name="fake-model", max_model_len=64))


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Litestar]:
    application = _app(tmp_path)
    async with AsyncTestClient(application):  # runs the lifespan in this loop
        yield application


def _handler(app: Litestar, path: str) -> Any:
    return app.route_handler_method_map[path]["POST"]


def test_the_hot_routes_are_planned_lean_and_the_others_are_not(tmp_path: Path) -> None:
    app = _app(tmp_path)
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert not isinstance(lean_plan(_handler(app, path)), str), path
    # /v1/responses takes the Request: served by Litestar, and the plan says why.
    why = lean_plan(_handler(app, "/v1/responses"))
    assert isinstance(why, str)
    assert "request" in why


def _plans(*handlers: Any) -> list[Any]:
    app = Litestar(
        route_handlers=list(handlers),
        dependencies={"gateway": Provide(provide_gateway, sync_to_thread=False)},
    )
    return [lean_plan(app.route_handler_method_map[h.paths.pop()]["POST"]) for h in handlers]


def test_a_handler_the_lean_path_cannot_call_exactly_is_left_to_litestar() -> None:
    async def guard(connection: Any, handler: Any) -> None:
        return None

    @post("/guarded", guards=[guard], status_code=200)
    async def guarded(data: ChatCompletionRequest, gateway: Gateway) -> JSONBytes:
        raise AssertionError

    @post("/headers", response_headers=[ResponseHeader(name="x-a", value="1")], status_code=200)
    async def headers(data: ChatCompletionRequest, gateway: Gateway) -> JSONBytes:
        raise AssertionError

    @post("/plain-response", status_code=200)
    async def plain(data: ChatCompletionRequest, gateway: Gateway) -> Response[bytes]:
        raise AssertionError

    @post("/more-params", status_code=200)
    async def more(data: ChatCompletionRequest, gateway: Gateway, state: State) -> SSEStream:
        raise AssertionError

    @post("/dict-body", status_code=200)
    async def dict_body(data: dict[str, Any], gateway: Gateway) -> JSONBytes:
        raise AssertionError

    @post("/created")  # a POST answers 201 unless told
    async def created(data: ChatCompletionRequest, gateway: Gateway) -> JSONBytes:
        raise AssertionError

    @post("/no-gateway", status_code=200)
    async def no_gateway(data: ChatCompletionRequest) -> JSONBytes:
        raise AssertionError

    @post("/fine", status_code=200)
    async def fine(data: ChatCompletionRequest, gateway: Gateway, scope: Scope) -> JSONBytes:
        raise AssertionError

    reasons = _plans(guarded, headers, plain, more, dict_body, created, no_gateway, fine)
    assert reasons[0] == "it has guards"
    assert reasons[1] == "it has response_headers"
    assert reasons[2] == "it does not return a JSONBytes or an SSEStream"
    assert "data, gateway and optionally scope" in reasons[3]
    assert "not a msgspec struct" in reasons[4]
    assert reasons[5] == "status code 201"
    assert "data, gateway and optionally scope" in reasons[6]
    assert not isinstance(reasons[7], str)


def _without_created(body: bytes) -> list[Any]:
    """The response's JSON objects (one, or one per SSE event), ``created`` dropped."""
    text = body.decode()
    docs = (
        [json.loads(b[len("data: ") :]) for b in text.split("\n\n") if b and "[DONE]" not in b]
        if text.startswith("data: ")
        else [json.loads(text)]
    )
    for d in docs:
        d.pop("created", None)
    return docs


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3, "stream": True}),
        (
            "/v1/chat/completions",
            {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 3}),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 3, "stream": 1}),
    ],
)
async def test_a_plain_request_is_served_lean_with_what_litestar_serves(
    app: Litestar, path: str, body: dict[str, Any]
) -> None:
    # Litestar converts laxly ("3" is 3, 1 is true); the strict decoder refuses those, so
    # the second request takes Litestar's path: both answer the same.
    strict = {**body, "stream": bool(body.get("stream"))}
    lax = {**body, "max_tokens": "3"}
    lean = await serve(app, path, [json.dumps(strict).encode()])
    litestar = await serve(app, path, [json.dumps(lax).encode()])
    assert (lean.lean, litestar.lean) == (True, False)
    assert lean.status == litestar.status == 200, (lean.body, litestar.body)
    assert _without_created(lean.body) == _without_created(litestar.body)
    assert dict(lean.messages[0]["headers"]).keys() == dict(litestar.messages[0]["headers"]).keys()


async def test_a_body_in_pieces_is_gathered(app: Litestar) -> None:
    raw = json.dumps({**CHAT, "max_tokens": 2}).encode()
    served = await serve(app, "/v1/chat/completions", [raw[:10], raw[10:30], raw[30:]])
    assert (served.status, served.lean) == (200, True)
    assert served.json()["choices"][0]["message"]["content"] == "The quick"


@pytest.mark.parametrize("pieces", [1, 3])
async def test_a_body_past_the_limit_gets_litestars_413(app: Litestar, pieces: int) -> None:
    raw = json.dumps({**CHAT, "max_tokens": 2, "pad": "x" * MAX_BODY}).encode()
    step = -(-len(raw) // pieces)
    served = await serve(
        app, "/v1/chat/completions", [raw[i : i + step] for i in range(0, len(raw), step)]
    )
    # Only Litestar's path answers 413 (it raises before it keeps the body).
    assert served.status == 413
    assert_valid("ErrorResponse", served.json())


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "fake-model", "messages": [}', None),
        (json.dumps({**CHAT, "temperature": 9}).encode(), "temperature"),
        (json.dumps({"model": "fake-model"}).encode(), "messages"),
    ],
)
async def test_bad_input_gets_litestars_400_with_the_body_replayed(
    app: Litestar, raw: bytes, param: str | None
) -> None:
    served = await serve(app, "/v1/chat/completions", [raw[:5], raw[5:]])
    assert (served.status, served.lean) == (400, False)
    assert ScopeState.from_scope(served.scope).body == raw  # type: ignore[arg-type]
    err = served.json()
    assert_valid("ErrorResponse", err)
    assert err["error"]["param"] == param


async def test_a_client_gone_while_uploading_gets_litestars_answer(app: Litestar) -> None:
    raw = json.dumps(CHAT).encode()
    served = await serve(app, "/v1/chat/completions", [raw[:5]], disconnect_after_body=True)
    # What Litestar's Request raises when the client leaves mid-body (nobody reads it).
    assert served.status == 500
    assert "disconnected prematurely" in served.json()["error"]["message"]


async def test_an_engine_still_starting_is_503_on_the_lean_path(app: Litestar) -> None:
    gw: Gateway = app.state.gateway
    router, gw.router = gw.router, None
    try:
        served = await serve(app, "/v1/chat/completions", [json.dumps(CHAT).encode()])
    finally:
        gw.router = router
    assert served.status == 503
    assert served.json()["error"]["code"] == "engine_not_ready"
    assert (b"x-request-id", b"lean-test") in served.messages[0]["headers"]


async def test_api_keys_are_checked_before_the_lean_path(tmp_path: Path) -> None:
    from gateway.auth.keys import APIKey, AuthSettings, hash_key

    key = "sk-" + "a" * 40
    settings = Settings(
        home=str(tmp_path / "home"),
        engine=EngineSettings(kind="fake", max_model_len=64),
        auth=AuthSettings(api_keys=[APIKey(id="a", sha256=hash_key(key))]),
    )
    application = create_app(settings, engine=FakeEngine("fake-model", 64))
    raw = json.dumps({**CHAT, "max_tokens": 1}).encode()
    async with AsyncTestClient(application):
        refused = await serve(application, "/v1/chat/completions", [raw])
        ok = await serve(
            application,
            "/v1/chat/completions",
            [raw],
            headers=[(b"authorization", f"Bearer {key}".encode())],
        )
    assert refused.status == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert (ok.status, ok.lean) == (200, True)


async def test_a_lean_stream_keeps_the_apps_stall_bound(tmp_path: Path) -> None:
    application = _app(tmp_path, stream_stall_s=0.2)
    raw = json.dumps({**CHAT, "max_tokens": 3, "stream": True}).encode()
    async with AsyncTestClient(application) as client:
        never = asyncio.Event()  # the client reads nothing: every body send waits
        served = await serve(application, "/v1/chat/completions", [raw], send_wait=never)
        metrics = (await client.get("/metrics")).text
    assert served.lean
    assert [m["type"] for m in served.messages] == ["http.response.start"]
    assert "retort_stream_stalls_total 1.0" in metrics


# -- LeanApp: the hot routes dispatched before Litestar's router ------------------------------


def test_the_hot_routes_and_only_they_are_dispatched_before_the_router(tmp_path: Path) -> None:
    app = _app(tmp_path)
    assert isinstance(app, LeanApp)
    assert set(app.lean_routes()) == {"/v1/chat/completions", "/v1/completions"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 3, "stream": True}),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 3}),
        # Errors raised by the handler: Litestar's exception handling answers them.
        ("/v1/chat/completions", {**CHAT, "model": "nope"}),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": 5}}),
        ("/v1/completions", {"model": "fake-model", "prompt": "word " * 100}),
    ],
)
async def test_an_early_dispatch_answers_what_the_router_answers(
    app: Litestar, path: str, body: dict[str, Any]
) -> None:
    raw = json.dumps(body).encode()
    early = await serve(app, path, [raw])
    # The same route through Litestar's router (which strips the trailing slash).
    routed = await serve(app, path + "/", [raw])
    assert (early.early, early.lean, routed.early, routed.lean) == (True, True, False, True)
    assert early.status == routed.status, (early.body, routed.body)
    assert early.messages[0]["headers"] == routed.messages[0]["headers"]
    assert (b"x-request-id", b"lean-test") in early.messages[0]["headers"]
    assert _without_created(early.body) == _without_created(routed.body)
    if early.status != 200:
        assert_valid("ErrorResponse", early.json())


async def test_a_bad_host_or_a_root_path_goes_through_the_router(app: Litestar) -> None:
    raw = json.dumps({**CHAT, "max_tokens": 1}).encode()
    bad_host = await serve(app, "/v1/chat/completions", [raw], host=b"bad host/")
    assert (bad_host.status, bad_host.early) == (400, False)
    assert_valid("ErrorResponse", bad_host.json())
    mounted = await serve(app, "/api/v1/chat/completions", [raw], root_path="/api")
    assert (mounted.status, mounted.early) == (200, False)


def _lean_app(*handlers: Any, **kwargs: Any) -> LeanApp:
    return LeanApp(
        route_handlers=list(handlers),
        dependencies={"gateway": Provide(provide_gateway, sync_to_thread=False)},
        **kwargs,
    )


async def _ok_chat(data: ChatCompletionRequest, gateway: Gateway) -> JSONBytes:
    return JSONBytes(b"{}")


def test_a_route_with_other_middleware_or_an_app_with_cors_is_not_dispatched_early() -> None:
    from litestar import Router
    from litestar.config.cors import CORSConfig

    def other(app: Any) -> Any:
        return app

    def known_mw(app: Any) -> Any:
        return app

    def check(scope: Any) -> None:
        return None

    known = post("/known", status_code=200, middleware=[LeanRoute])(_ok_chat)
    unknown = post("/unknown", status_code=200, middleware=[LeanRoute])(_ok_chat)
    groups = [Router("/a", middleware=[known_mw], route_handlers=[known]),
              Router("/b", middleware=[other], route_handlers=[unknown])]  # fmt: skip
    app = _lean_app(*groups, lean_checks={known_mw: check})
    assert set(app.lean_routes()) == {"/a/known"}
    cors = _lean_app(*groups, lean_checks={known_mw: check}, cors_config=CORSConfig())
    assert cors.lean_routes() == {}


async def test_an_early_route_runs_its_checks_and_the_apps_hooks(tmp_path: Path) -> None:
    seen: list[str] = []

    def check(scope: Any) -> None:
        seen.append("check")
        if (b"x-no", b"1") in scope["headers"]:
            raise PermissionError("no")

    async def after_exception(exc: Exception, scope: Any) -> None:
        seen.append(type(exc).__name__)

    def middleware(app: Any) -> Any:
        async def run(scope: Any, receive: Any, send: Any) -> None:
            check(scope)
            await app(scope, receive, send)

        return run

    handler = post("/chat", status_code=200, middleware=[LeanRoute])(_ok_chat)
    from litestar import Router

    app = _lean_app(
        Router("/v", middleware=[middleware], route_handlers=[handler]),
        lean_checks={middleware: check},
        after_exception=[after_exception],
    )
    app.state.gateway = Gateway(Settings(home=str(tmp_path)), router=object())  # type: ignore[arg-type]
    ok = await serve(app, "/v/chat", [json.dumps(CHAT).encode()])
    assert (ok.status, ok.early, ok.body) == (200, True, b"{}")
    assert seen == ["check"]
    refused = await serve(app, "/v/chat", [b"{}"], headers=[])
    assert refused.status == 400  # the strict decode refused it: Litestar's path, check again
    assert seen == ["check", "check", "check", "ValidationException"]
    seen.clear()
    denied = await serve(app, "/v/chat", [json.dumps(CHAT).encode()], headers=[(b"x-no", b"1")])
    assert denied.status == 500  # PermissionError: no handler maps it, Litestar's 500
    assert seen == ["check", "PermissionError"]


async def test_a_failure_after_the_response_started_is_litestars_error(tmp_path: Path) -> None:
    from litestar.exceptions import LitestarException

    handler = post("/chat", status_code=200, middleware=[LeanRoute])(_ok_chat)
    app = _lean_app(handler)
    app.state.gateway = Gateway(Settings(home=str(tmp_path)), router=object())  # type: ignore[arg-type]
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": json.dumps(CHAT).encode(), "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            raise OSError("connection lost")
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/chat", "headers": [], "state": {}}
    with pytest.raises(LitestarException, match="after response started"):
        await app(scope, receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["http.response.start"]
