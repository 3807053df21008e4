"""Shared serving machinery for chat and completions: admit, start, aggregate, stream.

The first chunk is awaited before any byte is sent, so errors that the engine raises up
front (prompt too long, bad token ids, engine dead) become a proper HTTP error instead of
an error inside a 200 stream. Later failures are sent as an SSE ``error`` event, followed
by ``[DONE]``, which the ``openai`` client raises as an ``APIError``. Accounting (metrics,
cost, the prompt log) lives in :mod:`gateway.openai.accounting`, SSE framing and writing in
:mod:`gateway.openai.sse`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from gateway.engines.base import (
    Chunk,
    EngineNotReadyError,
    GenerateRequest,
    PromptTooLongError,
    Sampling,
    plain_sampling,
)
from gateway.errors import BadRequestError, ServiceUnavailableError
from gateway.openai.accounting import (
    COST_HEADER,
    ENDPOINT_STATE,
    KEY_STATE,
    RequestInfo,
    Started,
    failed_before_start,
    request_info,
    strip_id_prefix,
    usage_of,
)
from gateway.openai.sse import DONE, SSEStream, sse, sse_error
from gateway.requestid import new_request_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from gateway.admission import Admission
    from gateway.openai.protocol import Usage
    from gateway.routing import Route
    from gateway.state import Gateway

__all__ = [
    "COST_HEADER",
    "DONE",
    "ENDPOINT_STATE",
    "KEY_STATE",
    "Aggregate",
    "Generation",
    "GenerationEvents",
    "RequestInfo",
    "SSEStream",
    "Started",
    "aggregate",
    "request_info",
    "sse",
    "sse_error",
    "start",
    "stream_events",
    "strip_id_prefix",
    "usage_of",
]


async def start(
    gw: Gateway,
    info: RequestInfo,
    model: str,
    *,
    sampling: Sampling,
    id_prefix: str,
    tools: list[dict[str, Any]] | None = None,
) -> Started:
    """Admit the request (drain, limits), resolve the model, submit it to its engine and
    wait for the first chunk. Failures after admission are logged, flagged as failed."""
    if gw.draining:
        raise ServiceUnavailableError("The server is shutting down.", code="draining")
    routes = gw.routes
    # Without a key nothing is limited: no estimate to make.
    est = info.estimate_tokens(sampling) if info.key is not None else 0
    limit = await gw.limiter.acquire(info.key_id, est)
    gw.request_started()
    route: Route | None = None
    it: AsyncIterator[Chunk] | None = None
    admission: Admission | None = None
    try:
        # Requests a student cannot honour stay on the engine: a traffic split never
        # sends them to a student.
        route = await routes.resolve(model, split=plain_sampling(sampling))
        if not route.engine.ready():
            raise ServiceUnavailableError("The engine is not ready.")
        if route.served_by == "engine" and gw.admission is not None:
            await gw.admission.enter(sampling.n, route.adapter)  # 503 past a bounded wait
            admission = gw.admission
        engine_id = info.request_id if info.id_generated else new_request_id()
        req = GenerateRequest(
            request_id=engine_id,
            prompt=info.prompt,
            messages=info.messages,
            tools=tools,
            sampling=sampling,
            adapter=route.adapter,
        )
        it = route.engine.generate(req).__aiter__()
        try:
            first: Chunk | None = await it.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineNotReadyError as exc:
            raise ServiceUnavailableError(str(exc)) from exc
        except PromptTooLongError as exc:
            param = "messages" if info.messages is not None else "prompt"
            raise BadRequestError(str(exc), param=param, code="context_length_exceeded") from exc
    except BaseException as exc:
        try:
            if it is not None:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    await aclose()
        finally:
            if admission is not None and route is not None:
                admission.leave(sampling.n, route.adapter)
            if route is not None:
                route.lease.release()
                if isinstance(exc, Exception):
                    failed_before_start(gw, info, route, exc)
            gw.request_finished()
            await limit.release(0)
        raise
    base = route.engine.model_name
    if gw.metrics is not None:
        gw.metrics.request_started(base)
    t_first = time.perf_counter()
    return Started(
        id=f"{id_prefix}-{info.request_id}",
        created=int(info.created),
        first=first,
        rest=it,
        sampling=sampling,
        t_start=info.t_start,
        t_first=t_first,
        route=route,
        gw=gw,
        info=info,
        limit=limit,
        model=base,
        texts=[] if info.capture else None,
        admission=admission,
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


class Generation(Protocol):
    """What the encoders read: a :class:`Started` or a batch of them
    (:class:`~gateway.openai.batch.StartedBatch`)."""

    sampling: Sampling
    failed: bool

    def chunks(self) -> AsyncIterator[Chunk]: ...

    def aborted(self, reason: str | None = None) -> None: ...

    async def aclose(self) -> None: ...


async def aggregate(started: Generation) -> Aggregate:
    n = started.sampling.n
    agg = Aggregate(
        texts=[[] for _ in range(n)],
        finish=["stop"] * n,
        logprobs=[[] for _ in range(n)],
        completion_tokens=[0] * n,
    )
    if type(started) is Started:
        return await _aggregate_started(started, agg)
    try:
        async for c in started.chunks():
            agg.prompt_tokens = c.prompt_tokens
            agg.texts[c.index].append(c.text)
            agg.completion_tokens[c.index] = c.completion_tokens
            if c.logprobs:
                agg.logprobs[c.index].extend(c.logprobs)
            if c.finish_reason is not None:
                agg.finish[c.index] = c.finish_reason
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        started.aborted()
        raise
    finally:
        await started.aclose()
    return agg


async def _aggregate_started(started: Started, agg: Aggregate) -> Aggregate:
    """:func:`aggregate` of a :class:`Started`, with ``Started.chunks`` fused into the loop
    (one async-generator step less per token): the same counting, the same failure marks."""
    texts = started.texts
    completion = started.completion
    c = started.first
    step = started.rest.__anext__
    try:
        while True:
            if c is not None:
                started.prompt_tokens = agg.prompt_tokens = c.prompt_tokens
                completion[c.index] = agg.completion_tokens[c.index] = c.completion_tokens
                agg.texts[c.index].append(c.text)
                if c.logprobs:
                    agg.logprobs[c.index].extend(c.logprobs)
                if c.finish_reason is not None:
                    agg.finish[c.index] = c.finish_reason
                if c.index == 0:
                    if texts is not None:
                        texts.append(c.text)
                    if c.finish_reason is not None:
                        started.finish_reason = c.finish_reason
            try:
                c = await step()
            except StopAsyncIteration:
                break
            except Exception as exc:
                started.fail(exc)
                raise
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        started.aborted()
        raise
    finally:
        await started.aclose()
    return agg


class GenerationEvents:
    """A started generation as an :class:`~gateway.openai.sse.SSESource`: the prologue,
    one event per chunk (``render``), the usage event, with the accounting of ``started``."""

    __slots__ = ("prologue", "render", "started", "usage_event")

    def __init__(
        self,
        started: Generation,
        render: Callable[[Chunk], bytes],
        prologue: list[bytes] | None = None,
        usage_event: Callable[[Usage], bytes] | None = None,
    ) -> None:
        self.started = started
        self.render = render
        self.prologue = prologue
        self.usage_event = usage_event

    async def frames(self) -> AsyncIterator[bytes]:
        started = self.started
        render = self.render
        for ev in self.prologue or ():
            yield ev
        # ``render`` may hold a chunk back (b""): tool calls are sent once complete.
        if type(started) is Started:
            # ``Started.chunks`` fused into this loop: one async-generator step less per
            # token; the same counting and failure marks.
            texts = started.texts
            completion = started.completion
            c = started.first
            step = started.rest.__anext__
            while True:
                if c is not None:
                    started.prompt_tokens = c.prompt_tokens
                    completion[c.index] = c.completion_tokens
                    if c.index == 0:
                        if texts is not None:
                            texts.append(c.text)
                        if c.finish_reason is not None:
                            started.finish_reason = c.finish_reason
                    if frame := render(c):
                        yield frame
                try:
                    c = await step()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    started.fail(exc)
                    raise
            if self.usage_event is not None:
                done = list(completion.values())
                yield self.usage_event(usage_of(started.prompt_tokens, done))
            return
        if self.usage_event is None:
            async for c in started.chunks():
                if frame := render(c):
                    yield frame
            return
        prompt_tokens = 0
        counts = [0] * started.sampling.n
        async for c in started.chunks():
            prompt_tokens = c.prompt_tokens
            counts[c.index] = c.completion_tokens
            if frame := render(c):
                yield frame
        yield self.usage_event(usage_of(prompt_tokens, counts))

    def failed(self, exc: Exception) -> None:
        self.started.failed = True

    def disconnected(self, reason: str | None = None) -> None:
        self.started.aborted(reason)

    async def aclose(self) -> None:
        await self.started.aclose()


def stream_events(
    started: Generation,
    render: Callable[[Chunk], bytes],
    *,
    prologue: list[bytes] | None = None,
    usage_event: Callable[[Usage], bytes] | None = None,
) -> GenerationEvents:
    """Frame a generation as SSE: prologue, one event per chunk, usage, then ``[DONE]``
    (sent by :class:`~gateway.openai.sse.SSEStream`)."""
    return GenerationEvents(started, render, prologue, usage_event)
