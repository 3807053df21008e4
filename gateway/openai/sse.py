"""Server-sent events: framing, and a writer that sends them straight to ASGI ``send``.

The writer knows nothing of requests, tokens or the prompt log: it pulls pre-encoded SSE
frames from an :class:`SSESource` and tells the source when the stream failed, when the
client went away, and when it is over (:meth:`SSESource.aclose`, where accounting lives).

Frames that are ready together go out in one ``http.response.body`` message (one socket
write): after each frame the writer asks the source for the next one *without waiting*;
only when the source would have to wait (for the engine's next step) does it flush what it
holds, so the first token, and every token after a wait, is sent at once, never held back
to be coalesced. A failure mid-stream becomes an SSE ``error`` event, then ``[DONE]``.

At ~400 lines on purpose: the framing, the coalescing writer and its stall and disconnect
handling are one hot path, kept in one file so its cost can be read in one place.

Once the source has to wait, a task watches ``receive`` for ``http.disconnect`` and cancels
the writer, which closes the source at once (so the engine aborts the request) instead of
at the next token. A stream whose frames are all ready at once never needs that task.

A client that stops reading fills the socket's buffers; the server's ``send`` then waits
(backpressure: no more frames are pulled from the source, so nothing piles up here). When
one ``send`` waits longer than ``stall_s`` (``server.stream_stall_s``), the stream is cut
like a disconnect: the source is closed and the engine request aborted. ``send`` is driven
by hand so that only a ``send`` that really waits arms that timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import types
from typing import TYPE_CHECKING, Any, Protocol

from litestar.response import Response

from gateway.errors import to_api_error
from gateway.openai.protocol import ErrorBody, ErrorResponse, encode

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable

    from litestar import Request
    from litestar.datastructures import Cookie
    from litestar.types import ASGIApp, HTTPResponseBodyEvent, Receive, Send

__all__ = [
    "DONE",
    "MAX_WRITE_BYTES",
    "JSONBytes",
    "SSESource",
    "SSEStream",
    "iterate_events",
    "sse",
    "sse_error",
    "text_template",
    "write_events",
]

DONE = b"data: [DONE]\n\n"
MAX_WRITE_BYTES = 64 * 1024
"""Frames ready together are coalesced into one write up to about this many bytes."""
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("retort.sse")


def sse(obj: Any) -> bytes:
    """One server-sent event holding ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


_SENTINEL = "\x00retort-text\x00"


def text_template(frame_with: Callable[[str], bytes]) -> tuple[bytes, bytes] | None:
    """The frame that ``frame_with`` builds around one text, cut into the bytes before and
    after that text's JSON string, or ``None`` if the cut is not unique.

    A stream's frames differ only by their token text, so ``head + encode(text) + tail``
    (one string encoded per token) is the same bytes as building and encoding the whole
    chunk struct for each token.
    """
    marker = encode(_SENTINEL)
    frame = frame_with(_SENTINEL)
    if frame.count(marker) != 1:
        return None
    head, tail = frame.split(marker)
    return head, tail


def sse_error(exc: BaseException) -> bytes:
    """The OpenAI-shaped error event for a failure mid-stream."""
    err = to_api_error(exc)
    body = ErrorResponse(
        error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    return sse(body)


class SSESource(Protocol):
    """What :func:`write_events` streams."""

    def frames(self) -> AsyncIterator[bytes]:
        """Complete SSE events (``data: ...\\n\\n``), without the final ``[DONE]``."""
        ...

    def failed(self, exc: Exception) -> None:
        """``frames`` raised ``exc``; an error event and ``[DONE]`` end the stream."""
        ...

    def disconnected(self, reason: str | None = None) -> None:
        """The client went away (or stopped reading: ``reason``) before the end."""
        ...

    async def aclose(self) -> None:
        """The stream is over (sent, failed or abandoned); called exactly once."""
        ...


@types.coroutine
def _resume(step: Any, yielded: Any) -> Generator[Any, Any, bytes]:
    """Go on awaiting ``step`` (an ``__anext__`` awaitable that was driven by hand with
    ``send(None)`` and suspended, yielding ``yielded`` to the event loop)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # cancellation included: the source must see it
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = step.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


STALLED = "the client stopped reading the stream (server.stream_stall_s); it was cut"


class _Disconnect:
    """Cancels the writer's task when ``receive`` reports that the client went away, or
    when a ``send`` has waited ``stall_s`` for a client that reads nothing."""

    __slots__ = ("finished", "gone", "stall_s", "stalled", "task")

    def __init__(self, stall_s: float) -> None:
        self.task: asyncio.Task[Any] | None = None
        """The writer's task, looked up only once the stream has to wait for something."""
        self.stall_s = stall_s
        self.gone = False
        self.stalled = False
        self.finished = False

    def watch(self) -> None:
        """Called when the writer first waits (for the source or for ``send``)."""
        if self.task is None:
            self.task = asyncio.current_task()

    def stall(self) -> None:  # armed only while a send waits
        self.gone = self.stalled = True
        assert self.task is not None
        self.task.cancel()

    def __call__(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or self.finished:
            return
        if fut.exception() is None and fut.result():
            self.gone = True
            assert self.task is not None
            self.task.cancel()


async def _wait_disconnect(receive: Receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True


def _body(data: bytes, more: bool) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def _send(send: Send, data: bytes, more: bool, watch: _Disconnect) -> None:
    """``send`` one body message; if it has to wait (the client's buffers are full), cut
    the stream after ``watch.stall_s``."""
    step = send(_body(data, more))
    try:
        pending = step.send(None)  # type: ignore[attr-defined]
    except StopIteration:
        return
    if watch.stall_s <= 0:
        await _resume(step, pending)
        return
    watch.watch()
    timer = asyncio.get_running_loop().call_later(watch.stall_s, watch.stall)
    try:
        await _resume(step, pending)
    finally:
        timer.cancel()


async def write_events(
    source: SSESource,
    send: Send,
    receive: Receive,
    *,
    max_write_bytes: int = MAX_WRITE_BYTES,
    done: bool = True,
    stall_s: float = 0.0,
    on_stall: Callable[[], None] | None = None,
) -> None:
    """Send ``source``'s frames, then ``[DONE]``, as ``http.response.body`` messages.

    ``done=False``: the source sends its own ``[DONE]`` (only after an error is one added).
    ``stall_s`` > 0: a ``send`` that waits that long cuts the stream (``on_stall`` is
    called). The response start (status, headers) must already be sent.
    """
    watch = _Disconnect(stall_s)
    watcher: asyncio.Future[bool] | None = None  # started at the first wait only
    frames = source.frames()
    buf: list[bytes] = []
    size = 0
    suspended: Any = None
    try:
        try:
            next_frame = frames.__anext__
            while True:
                step: Awaitable[bytes] = next_frame()
                try:
                    pending = step.send(None)  # type: ignore[attr-defined]
                except StopIteration as ready:  # the next frame was ready without waiting
                    frame: bytes = ready.value
                except StopAsyncIteration:
                    break
                else:  # the source must wait: what is ready goes out first
                    if watcher is None:
                        watch.watch()
                        watcher = asyncio.ensure_future(_wait_disconnect(receive))
                        watcher.add_done_callback(watch)
                    if buf:
                        suspended = step  # mid-way while the ready frames go out
                        await _send(send, b"".join(buf), True, watch)
                        suspended = None
                        buf.clear()
                        size = 0
                    try:
                        frame = await _resume(step, pending)
                    except StopAsyncIteration:
                        break
                buf.append(frame)
                size += len(frame)
                if size >= max_write_bytes:
                    await _send(send, b"".join(buf), True, watch)
                    buf.clear()
                    size = 0
        except Exception as exc:  # after the first frame: an error event, then [DONE]
            source.failed(exc)
            buf.append(sse_error(exc))
            done = True
        if done:
            buf.append(DONE)
        watch.finished = True
        await _send(send, b"".join(buf), False, watch)
    except asyncio.CancelledError:
        if not watch.gone:
            source.disconnected()
            raise
        # Our own cancellation (the client left or stalled): nothing more to send.
        assert watch.task is not None
        watch.task.uncancel()
        if watch.stalled:
            log.warning("a stream was cut: the client read nothing for %g s", stall_s)
            source.disconnected(STALLED)
            if on_stall is not None:
                on_stall()
        else:
            source.disconnected()
    finally:
        watch.finished = True
        if watcher is not None:
            watcher.cancel()
        try:
            if suspended is not None:  # the send failed or stalled while it waited
                _abandon(suspended)
            await frames.aclose()  # type: ignore[attr-defined]
        finally:
            await source.aclose()


def _abandon(step: Any) -> None:
    """End a ``__anext__`` that was started by hand and never resumed, so that the source
    can be closed (an async generator mid-step refuses ``aclose``)."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        step.throw(asyncio.CancelledError())


async def iterate_events(stream: SSEStream) -> AsyncIterator[bytes]:
    """A stream's frames as a plain async iterator, ending with ``[DONE]``, with the same
    contract as :func:`write_events` (error event on failure, the source closed on every
    path): for a route that re-encodes another route's stream (``/v1/responses`` over
    chat)."""
    source = stream.source
    frames = source.frames()
    try:
        try:
            async for frame in frames:
                yield frame
        except Exception as exc:
            source.failed(exc)
            yield sse_error(exc)
            yield DONE
            return
        if stream.done:
            yield DONE
    except (asyncio.CancelledError, GeneratorExit):
        source.disconnected()
        raise
    finally:
        try:
            await frames.aclose()  # type: ignore[attr-defined]
        finally:
            await source.aclose()


class _IteratorSource:
    """An :class:`SSESource` over ready-made frames that end with their own ``[DONE]``."""

    __slots__ = ("iterator",)

    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        self.iterator = iterator

    def frames(self) -> AsyncIterator[bytes]:
        return self.iterator

    def failed(self, exc: Exception) -> None:
        return None

    def disconnected(self, reason: str | None = None) -> None:
        return None

    async def aclose(self) -> None:
        aclose = getattr(self.iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _raw_headers(headers: dict[str, Any], media_type: bytes) -> list[tuple[bytes, bytes]]:
    """``headers`` as ASGI wants them, with a content type unless one is there: what
    Litestar's ``ASGIResponse`` sends, without building its header multidict per request."""
    raw = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
    if not any(name == b"content-type" for name, _ in raw):
        raw.append((b"content-type", media_type))
    return raw


_SSE_RAW_HEADERS = _raw_headers(_HEADERS, b"text/event-stream; charset=utf-8")


class _ASGISSEResponse:
    """The ASGI side of :class:`SSEStream`: the response start, then :func:`write_events`;
    the source is closed on every path (also when the start itself fails)."""

    __slots__ = (
        "background",
        "done",
        "headers",
        "is_head",
        "on_stall",
        "source",
        "stall_s",
        "status",
    )

    def __init__(
        self,
        source: SSESource,
        done: bool,
        stall_s: float | None,
        on_stall: Callable[[], None] | None,
        *,
        status: int,
        headers: dict[str, Any],
        cookies: Iterable[Cookie],
        background: Callable[[], Awaitable[None]] | None,
        is_head: bool,
    ) -> None:
        # A stream's own headers, encoded once; only what a route layer adds is encoded here.
        raw = (
            list(_SSE_RAW_HEADERS)
            if headers == _HEADERS
            else _raw_headers(headers, b"text/event-stream; charset=utf-8")
        )
        raw.extend(c.to_encoded_header() for c in cookies if not c.documentation_only)
        self.headers = raw  # no content-length: a stream, chunked transfer encoding
        self.status = status
        self.source = source
        self.done = done
        self.stall_s = stall_s
        self.on_stall = on_stall
        self.background = background
        self.is_head = is_head

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        stall_s, on_stall = self.stall_s, self.on_stall
        if stall_s is None:
            stall_s, on_stall = _stall_policy(scope)
        try:
            await send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
            if self.is_head:
                await send(_body(b"", False))
        except BaseException:
            await self.source.aclose()  # nothing will be streamed: account for it now
            raise
        if self.is_head:
            await self.source.aclose()
        else:
            await write_events(
                self.source,
                send,
                receive,
                done=self.done,
                stall_s=stall_s,
                on_stall=on_stall,
            )
        if self.background is not None:
            await self.background()


def _stall_policy(scope: Any) -> tuple[float, Callable[[], None] | None]:
    """``server.stream_stall_s`` and the stall counter of the app serving ``scope``."""
    app = scope.get("litestar_app")
    gw = app.state.get("gateway") if app is not None else None
    if gw is None:
        return 0.0, None
    metrics = gw.metrics
    return gw.settings.server.stream_stall_s, metrics.stream_stalled if metrics else None


def _response_fields(
    response: Response[bytes], content: bytes, media_type: str, headers: dict[str, str] | None
) -> None:
    """What ``Response(content, media_type=..., headers=...)`` sets, set directly: its
    generic checks (``isinstance`` against ``typing.Mapping``, cookie and encoder merging)
    cost more than the rest of building these responses. A unit test holds the fields
    equal to Litestar's."""
    response.content = content
    response.background = None
    response.cookies = []
    response.encoding = "utf-8"
    response.headers = dict(headers) if headers else {}
    response.media_type = media_type
    response.status_code = None
    response.response_type_encoders = {}


class SSEStream(Response[bytes]):
    """A ``text/event-stream`` response written by :func:`write_events`.

    Litestar's ``Stream`` sends one ASGI message per item and watches for a disconnect in an
    anyio task group; here frames are coalesced and the source is always closed (so the
    engine request is aborted) through the public ``to_asgi_response``/``send_body`` hooks.
    """

    __slots__ = ("done", "source")

    def __init__(self, source: SSESource | AsyncIterator[bytes]) -> None:
        """``source``: an :class:`SSESource` (``[DONE]`` added here), or an async iterator
        of complete frames that ends with its own ``[DONE]``."""
        _response_fields(self, b"", "text/event-stream", _HEADERS)
        self.done = hasattr(source, "frames")
        self.source: SSESource = (
            source if self.done else _IteratorSource(source)  # type: ignore[assignment,arg-type]
        )

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **kwargs: Any
    ) -> Any:  # an ASGI app; Litestar only calls it
        headers = kwargs.get("headers")
        merged = {**headers, **self.headers} if headers else self.headers
        return _ASGISSEResponse(
            self.source,
            self.done,
            None,  # the serving app's stall policy, read when the stream starts
            None,
            status=self.status_code or kwargs.get("status_code") or 200,
            headers=merged,
            cookies=itertools.chain(self.cookies, kwargs.get("cookies") or ()),
            background=self.background or kwargs.get("background"),
            is_head=bool(kwargs.get("is_head_response")),
        )

    def asgi(self) -> ASGIApp:
        """The response as an ASGI app when no route layer adds to it (the lean path,
        :mod:`gateway.openai.lean`): what :meth:`to_asgi_response` gives without layers."""
        return self.to_asgi_response(None, None)  # type: ignore[no-any-return,arg-type]


class _ReadyJSON:
    """The ASGI side of :class:`JSONBytes`: two ``send`` calls, headers encoded once."""

    __slots__ = ("body", "headers")

    def __init__(self, body: bytes, headers: dict[str, Any]) -> None:
        self.body = body
        raw = _raw_headers(headers, b"application/json")
        raw.append((b"content-length", str(len(body)).encode()))
        self.headers = raw

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        await send(_body(self.body, False))


class JSONBytes(Response[bytes]):
    """A 200 ``application/json`` response of ready-encoded bytes (the non-streamed
    completions). The same status, headers and body as ``Response(body, media_type=JSON,
    headers=...)``, without Litestar's generic rendering (serializer lookup, header
    multidict, cookie encoding) on every request; anything else the route layers add
    (headers, cookies, background tasks, a HEAD request) falls back to it."""

    def __init__(self, body: bytes, headers: dict[str, str] | None = None) -> None:
        _response_fields(self, body, "application/json", headers)

    def to_asgi_response(self, app: Any, request: Request[Any, Any, Any], **kwargs: Any) -> Any:
        if (
            self.cookies
            or self.background
            or self.status_code not in (None, 200)
            or any(kwargs.get(k) for k in ("headers", "cookies", "background", "is_head_response"))
            or kwargs.get("status_code") not in (None, 200)
        ):
            return super().to_asgi_response(app, request, **kwargs)
        return _ReadyJSON(self.content, self.headers)

    def asgi(self) -> ASGIApp:
        """The response as an ASGI app when no route layer adds to it (the lean path,
        :mod:`gateway.openai.lean`): what :meth:`to_asgi_response` gives without layers.
        Litestar's own rendering reads nothing from the request."""
        return self.to_asgi_response(None, None)  # type: ignore[no-any-return,arg-type]
