"""Server-sent events: framing, and a writer that sends them straight to ASGI ``send``.

The writer knows nothing of requests, tokens or the prompt log: it pulls pre-encoded SSE
frames from an :class:`SSESource` and tells the source when the stream failed, when the
client went away, and when it is over (:meth:`SSESource.aclose`, where accounting lives).

Frames that are ready together go out in one ``http.response.body`` message (one socket
write): after each frame the writer asks the source for the next one *without waiting*;
only when the source would have to wait (for the engine's next step) does it flush what it
holds, so the first token, and every token after a wait, is sent at once, never held back
to be coalesced. A failure mid-stream becomes an SSE ``error`` event, then ``[DONE]``.

Once the source has to wait, a task watches ``receive`` for ``http.disconnect`` and cancels
the writer, which closes the source at once (so the engine aborts the request) instead of
at the next token. A stream whose frames are all ready at once never needs that task.
"""

from __future__ import annotations

import asyncio
import itertools
import types
from typing import TYPE_CHECKING, Any, Protocol

from litestar.response import Response
from litestar.response.base import ASGIResponse

from gateway.errors import to_api_error
from gateway.openai.protocol import ErrorBody, ErrorResponse, encode

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Generator

    from litestar import Request
    from litestar.types import HTTPResponseBodyEvent, Receive, Send

__all__ = [
    "DONE",
    "MAX_WRITE_BYTES",
    "SSESource",
    "SSEStream",
    "iterate_events",
    "sse",
    "sse_error",
    "write_events",
]

DONE = b"data: [DONE]\n\n"
MAX_WRITE_BYTES = 64 * 1024
"""Frames ready together are coalesced into one write up to about this many bytes."""
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> bytes:
    """One server-sent event holding ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


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

    def disconnected(self) -> None:
        """The client went away before the end."""
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


class _Disconnect:
    """Cancels the writer's task when ``receive`` reports that the client went away."""

    __slots__ = ("finished", "gone", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.gone = False
        self.finished = False

    def __call__(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or self.finished:
            return
        if fut.exception() is None and fut.result():
            self.gone = True
            self.task.cancel()


async def _wait_disconnect(receive: Receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True


def _body(data: bytes, more: bool) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def write_events(
    source: SSESource,
    send: Send,
    receive: Receive,
    *,
    max_write_bytes: int = MAX_WRITE_BYTES,
    done: bool = True,
) -> None:
    """Send ``source``'s frames, then ``[DONE]``, as ``http.response.body`` messages.

    ``done=False``: the source sends its own ``[DONE]`` (only after an error is one added).
    The response start (status, headers) must already be sent.
    """
    task = asyncio.current_task()
    assert task is not None  # ASGI apps always run in a task
    watch = _Disconnect(task)
    watcher: asyncio.Future[bool] | None = None  # started at the first wait only
    frames = source.frames()
    buf: list[bytes] = []
    size = 0
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
                        watcher = asyncio.ensure_future(_wait_disconnect(receive))
                        watcher.add_done_callback(watch)
                    if buf:
                        await send(_body(b"".join(buf), True))
                        buf.clear()
                        size = 0
                    try:
                        frame = await _resume(step, pending)
                    except StopAsyncIteration:
                        break
                buf.append(frame)
                size += len(frame)
                if size >= max_write_bytes:
                    await send(_body(b"".join(buf), True))
                    buf.clear()
                    size = 0
        except Exception as exc:  # after the first frame: an error event, then [DONE]
            source.failed(exc)
            buf.append(sse_error(exc))
            done = True
        if done:
            buf.append(DONE)
        watch.finished = True
        await send(_body(b"".join(buf), False))
    except asyncio.CancelledError:
        source.disconnected()
        if not watch.gone:
            raise
        # Our own cancellation (the client left): nothing more to send; close quietly.
        task.uncancel()
    finally:
        watch.finished = True
        if watcher is not None:
            watcher.cancel()
        try:
            await frames.aclose()  # type: ignore[attr-defined]
        finally:
            await source.aclose()


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

    def disconnected(self) -> None:
        return None

    async def aclose(self) -> None:
        aclose = getattr(self.iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class _ASGISSEResponse(ASGIResponse):
    __slots__ = ("done", "source")

    def __init__(self, source: SSESource, done: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        del self.headers["content-length"]  # a stream: chunked transfer encoding
        self.source = source
        self.done = done

    async def start_response(self, send: Send) -> None:
        try:
            await super().start_response(send)
        except BaseException:
            await self.source.aclose()  # nothing will be streamed: account for it now
            raise

    async def send_body(self, send: Send, receive: Receive) -> None:
        await write_events(self.source, send, receive, done=self.done)


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
        super().__init__(b"", media_type="text/event-stream", headers=_HEADERS)
        self.done = hasattr(source, "frames")
        self.source: SSESource = (
            source if self.done else _IteratorSource(source)  # type: ignore[assignment,arg-type]
        )

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **kwargs: Any
    ) -> ASGIResponse:
        headers = kwargs.get("headers")
        merged = {**headers, **self.headers} if headers else self.headers
        return _ASGISSEResponse(
            self.source,
            self.done,
            background=self.background or kwargs.get("background"),
            cookies=itertools.chain(self.cookies, kwargs.get("cookies") or ()),
            headers=merged,
            media_type="text/event-stream",
            status_code=self.status_code or kwargs.get("status_code"),
            is_head_response=bool(kwargs.get("is_head_response")),
        )
