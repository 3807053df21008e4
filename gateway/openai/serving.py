"""Shared serving machinery for chat and completions: start, aggregate, stream (SSE).

The first chunk is awaited before any byte is sent, so errors that the engine raises up
front (prompt too long, bad token ids, engine dead) become a proper HTTP error instead of
an error inside a 200 stream. Later failures are sent as an SSE ``error`` event, followed
by ``[DONE]``, which the ``openai`` client raises as an ``APIError``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse

from gateway.engines.base import (
    Chunk,
    EngineNotReadyError,
    GenerateRequest,
    PromptTooLongError,
    Sampling,
)
from gateway.errors import BadRequestError, ServiceUnavailableError, to_api_error
from gateway.openai.protocol import ErrorBody, ErrorResponse, Usage, encode

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from litestar.types import Send

    from gateway.metrics import Metrics
    from gateway.routing import Route
    from gateway.state import Gateway

__all__ = [
    "DONE",
    "Aggregate",
    "SSEStream",
    "Started",
    "aggregate",
    "sse",
    "sse_error",
    "start",
]

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event holding ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    err = to_api_error(exc)
    body = ErrorResponse(
        error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    return sse(body)


class _ClosingStreamingResponse(ASGIStreamingResponse):
    __slots__ = ()

    async def _stream(self, send: Send) -> None:
        try:
            await super()._stream(send)
        finally:
            aclose = getattr(self.iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class SSEStream(Stream):
    """A ``text/event-stream`` response that always closes its iterator.

    Litestar cancels the send loop when the client disconnects, which can leave the
    generator suspended; closing it (shielded from that cancellation) propagates to the
    engine at once, which aborts the request.
    """

    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        super().__init__(
            iterator,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        if type(response) is ASGIStreamingResponse:
            response.__class__ = _ClosingStreamingResponse
        return response


@dataclass(slots=True)
class Started:
    """A generation whose first chunk has arrived."""

    id: str
    created: int
    first: Chunk | None
    rest: AsyncIterator[Chunk]
    sampling: Sampling
    t_start: float
    t_first: float
    route: Route
    model: str = ""
    metrics: Metrics | None = None
    prompt_tokens: int = 0
    completion: dict[int, int] = field(default_factory=dict)
    failed: bool = False
    _closed: bool = False

    async def chunks(self) -> AsyncIterator[Chunk]:
        try:
            if self.first is not None:
                self._count(self.first)
                yield self.first
            async for c in self.rest:
                self._count(c)
                yield c
        except Exception:
            self.failed = True
            raise

    def _count(self, c: Chunk) -> None:
        self.prompt_tokens = c.prompt_tokens
        self.completion[c.index] = c.completion_tokens

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self.rest, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self.route.lease.release()
            if self.metrics is not None:
                self.metrics.request_finished(self.model)
                self.metrics.observe_request(
                    self.model,
                    self.route.adapter,
                    "error" if self.failed else "ok",
                    self.prompt_tokens,
                    sum(self.completion.values()),
                    self.t_first - self.t_start if self.first is not None else None,
                    time.perf_counter() - self.t_start,
                    0.0,
                )


async def start(
    gw: Gateway,
    model: str,
    *,
    prompt: str | list[int] | None = None,
    messages: list[dict[str, str]] | None = None,
    sampling: Sampling,
    id_prefix: str,
) -> Started:
    """Resolve the model, submit to its engine and wait for the first chunk."""
    if gw.draining:
        raise ServiceUnavailableError("The server is shutting down.", code="draining")
    route = await gw.routes.resolve(model)
    if not route.engine.ready():
        route.lease.release()
        raise ServiceUnavailableError("The engine is not ready.")
    engine_id = uuid.uuid4().hex
    req = GenerateRequest(
        request_id=engine_id,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        adapter=route.adapter,
    )
    t0 = time.perf_counter()
    base = route.engine.model_name
    it = route.engine.generate(req).__aiter__()
    try:
        try:
            first: Chunk | None = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineNotReadyError as exc:
            raise ServiceUnavailableError(str(exc)) from exc
        except PromptTooLongError as exc:
            param = "messages" if messages is not None else "prompt"
            raise BadRequestError(str(exc), param=param, code="context_length_exceeded") from exc
    except BaseException:
        route.lease.release()
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    if gw.metrics is not None:
        gw.metrics.request_started(base)
    return Started(
        id=f"{id_prefix}-{engine_id}",
        created=int(time.time()),
        first=first,
        rest=it,
        sampling=sampling,
        t_start=t0,
        t_first=time.perf_counter(),
        route=route,
        model=base,
        metrics=gw.metrics,
    )


@dataclass(slots=True)
class Aggregate:
    """Every choice of a finished generation."""

    texts: list[list[str]]
    finish: list[str]
    logprobs: list[list[Any]]
    prompt_tokens: int = 0
    completion_tokens: list[int] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        return usage_of(self.prompt_tokens, self.completion_tokens)

    def text(self, i: int) -> str:
        return "".join(self.texts[i])


async def aggregate(started: Started) -> Aggregate:
    n = started.sampling.n
    agg = Aggregate(
        texts=[[] for _ in range(n)],
        finish=["stop"] * n,
        logprobs=[[] for _ in range(n)],
        completion_tokens=[0] * n,
    )
    try:
        async for c in started.chunks():
            agg.prompt_tokens = c.prompt_tokens
            agg.texts[c.index].append(c.text)
            agg.completion_tokens[c.index] = c.completion_tokens
            if c.logprobs:
                agg.logprobs[c.index].extend(c.logprobs)
            if c.finish_reason is not None:
                agg.finish[c.index] = c.finish_reason
    finally:
        await started.aclose()
    return agg


def usage_of(prompt_tokens: int, completion: list[int]) -> Usage:
    done = sum(completion)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
    )


async def stream_events(
    started: Started,
    render: Callable[[Chunk], bytes],
    *,
    prologue: list[bytes] | None = None,
    usage_event: Callable[[Usage], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Frame a generation as SSE: prologue, one event per chunk, usage, then ``[DONE]``."""
    prompt_tokens = 0
    completion = [0] * started.sampling.n
    try:
        for ev in prologue or ():
            yield ev
        async for c in started.chunks():
            prompt_tokens = c.prompt_tokens
            completion[c.index] = c.completion_tokens
            yield render(c)
        if usage_event is not None:
            yield usage_event(usage_of(prompt_tokens, completion))
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        raise
    except Exception as exc:
        started.failed = True
        yield sse_error(exc)
    finally:
        await started.aclose()
    yield DONE
