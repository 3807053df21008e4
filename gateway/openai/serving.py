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
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import msgspec
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
from gateway.promptlog.policy import LOG_HEADER, TAGS_HEADER, parse_tags
from gateway.requestid import request_id
from retort.db.record import LogRecord

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from litestar import Request
    from litestar.types import Send

    from gateway.auth import KeyInfo, LimitLease
    from gateway.openai.protocol import SamplingFields
    from gateway.routing import Route
    from gateway.state import Gateway

__all__ = [
    "COST_HEADER",
    "DONE",
    "ENDPOINT_STATE",
    "KEY_STATE",
    "Aggregate",
    "Generation",
    "RequestInfo",
    "SSEStream",
    "Started",
    "aggregate",
    "request_info",
    "sse",
    "sse_error",
    "start",
    "strip_id_prefix",
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


KEY_STATE = "retort_key"
"""``scope["state"]`` key where the API guard leaves the caller's :class:`KeyInfo`."""
ENDPOINT_STATE = "retort_endpoint"
"""``scope["state"]`` key naming the API endpoint when a route serves through another's
handler (``/v1/responses`` through chat): the log record and the endpoint metric use it."""
COST_HEADER = "x-retort-cost-usd"
_ID_PREFIXES = ("chatcmpl-", "cmpl-", "resp_")
_DEFAULT_EST_COMPLETION = 256
"""Completion tokens assumed for the rate limiter when a request sets no ``max_tokens``."""


def strip_id_prefix(response_id: str) -> str:
    """``chatcmpl-<request id>`` -> ``<request id>`` (what the prompt log is keyed by)."""
    for prefix in _ID_PREFIXES:
        if response_id.startswith(prefix):
            return response_id[len(prefix) :]
    return response_id


@dataclass(slots=True)
class RequestInfo:
    """What a request looks like before generation: for the log, limits and metrics."""

    request_id: str
    endpoint: Literal["chat", "completions", "responses"]
    created: float
    t_start: float
    key: KeyInfo | None = None
    capture: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    id_generated: bool = False
    """The request id is ours (unique), not the client's ``x-request-id``."""

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None

    def estimate_tokens(self, sampling: Sampling) -> int:
        """Prompt (about 4 characters a token) plus the completion budget, for ``tpm``."""
        if self.messages is not None:
            chars = sum(len(m.get("content") or "") for m in self.messages)
            prompt = chars // 4 + 4 * len(self.messages)
        elif isinstance(self.prompt, list):
            prompt = len(self.prompt)
        else:
            prompt = len(self.prompt or "") // 4
        budget = sampling.max_tokens if sampling.max_tokens is not None else _DEFAULT_EST_COMPLETION
        return prompt + budget * sampling.n

    def record(
        self,
        gw: Gateway,
        *,
        model: str,
        route: Route | None,
        completion: str = "",
        finish_reason: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ttft_s: float | None = None,
        latency_s: float = 0.0,
        cost_usd: float = 0.0,
        error: str | None = None,
    ) -> LogRecord | None:
        """Queue this request's log record (a no-op unless it is captured); returns it."""
        plog = gw.promptlog
        if not self.capture or plog is None:
            return None
        prompt = self.prompt
        if isinstance(prompt, list):
            prompt = None
            params = {**self.params, "prompt_token_ids": self.prompt}
        else:
            params = self.params
        record = LogRecord(
            request_id=self.request_id,
            created=self.created,
            model=model,
            endpoint=self.endpoint,
            key_id=self.key_id,
            adapter=route.adapter if route is not None else None,
            served_by="student" if route is not None and route.served_by == "student" else "engine",
            messages=self.messages,
            prompt=prompt,
            params=params,
            completion=completion,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=ttft_s,
            latency_s=latency_s,
            cost_usd=cost_usd,
            status="error" if error is not None else "ok",
            error=error,
            tags=self.tags,
            user=self.user,
        )
        plog.submit(record)
        return record


def request_info(
    gw: Gateway,
    request: Request[Any, Any, Any],
    endpoint: Literal["chat", "completions"],
    data: SamplingFields,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt: str | list[int] | None = None,
) -> RequestInfo:
    """Gather the request's identity and log fields (cheap when it is not captured)."""
    state = request.scope.setdefault("state", {})
    rid = request_id(request.scope)
    key: KeyInfo | None = state.get(KEY_STATE)
    info = RequestInfo(
        request_id=rid,
        endpoint=state.get(ENDPOINT_STATE, endpoint),
        created=time.time(),
        t_start=time.perf_counter(),
        key=key,
        messages=messages,
        prompt=prompt,
        id_generated=bool(state.get("request_id_generated")),
    )
    plog = gw.promptlog
    if plog is not None and plog.should_capture(rid, info.key_id, request.headers.get(LOG_HEADER)):
        info.capture = True
        info.params = {
            k: v
            for k, v in msgspec.structs.asdict(data).items()
            if v is not None and k not in _NOT_PARAMS
        }
        if info.params:
            info.params = msgspec.to_builtins(info.params)
        info.tags = parse_tags(request.headers.get(TAGS_HEADER), data.metadata)
        info.user = data.user
    return info


_NOT_PARAMS = frozenset({"model", "messages", "prompt", "metadata", "user"})


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
    gw: Gateway
    info: RequestInfo
    limit: LimitLease
    model: str = ""
    prompt_tokens: int = 0
    completion: dict[int, int] = field(default_factory=dict)
    texts: list[str] | None = None
    """Choice 0's text pieces, kept only when the request is logged."""
    finish_reason: str | None = None
    failed: bool = False
    error: str | None = None
    cost_usd: float = 0.0
    """Set when the generation is closed (the ``x-retort-cost-usd`` header)."""
    _closed: bool = False

    async def chunks(self) -> AsyncIterator[Chunk]:
        try:
            if self.first is not None:
                self._count(self.first)
                yield self.first
            async for c in self.rest:
                self._count(c)
                yield c
        except Exception as exc:
            self.failed = True
            self.error = to_api_error(exc).message
            raise

    def _count(self, c: Chunk) -> None:
        self.prompt_tokens = c.prompt_tokens
        self.completion[c.index] = c.completion_tokens
        if c.index == 0:
            if self.texts is not None:
                self.texts.append(c.text)
            if c.finish_reason is not None:
                self.finish_reason = c.finish_reason

    def aborted(self) -> None:
        """The client went away before the end."""
        if not self.failed:
            self.failed = True
            self.error = "the client disconnected before the end"

    async def aclose(self) -> None:
        """Abort the engine request if unfinished, then account for it: metrics, cost,
        the log record, and the key's, adapter's and drain's holds."""
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self.rest, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            gw = self.gw
            route = self.route
            completion_tokens = sum(self.completion.values())
            latency = time.perf_counter() - self.t_start
            ttft = self.t_first - self.t_start if self.first is not None else None
            try:
                self.cost_usd = gw.pricer.cost(
                    self.model, route.adapter, self.prompt_tokens, completion_tokens
                )
                gw.pricer.observe(self.prompt_tokens, completion_tokens, latency)
                metrics = gw.metrics
                if metrics is not None:
                    metrics.request_finished(self.model)
                    metrics.observe_request(
                        self.model,
                        route.adapter,
                        "error" if self.failed else "ok",
                        self.prompt_tokens,
                        completion_tokens,
                        ttft,
                        latency,
                        self.cost_usd,
                        self.info.key_id,
                        self.info.endpoint,
                    )
                record = self.info.record(
                    gw,
                    model=self.model,
                    route=route,
                    completion="".join(self.texts) if self.texts is not None else "",
                    finish_reason=self.finish_reason,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=completion_tokens,
                    ttft_s=ttft,
                    latency_s=latency,
                    cost_usd=self.cost_usd,
                    error=self.error if self.failed else None,
                )
                if record is not None and gw.shadow is not None:
                    s = self.sampling
                    gw.shadow.submit(
                        record,
                        s,
                        shadowable=s.constraint is None
                        and not s.logit_bias
                        and s.logprobs is None
                        and "tools" not in record.params,
                    )
            finally:
                route.lease.release()
                gw.request_finished()
                await self.limit.release(self.prompt_tokens + completion_tokens)

    def cost_headers(self) -> dict[str, str]:
        return {COST_HEADER: f"{self.cost_usd:.10f}".rstrip("0").rstrip(".") or "0"}


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
    limit = await gw.limiter.acquire(info.key_id, info.estimate_tokens(sampling))
    gw.request_started()
    route: Route | None = None
    it: AsyncIterator[Chunk] | None = None
    try:
        # Constrained, biased or tool requests stay on the engine that honours them: a
        # traffic split never sends them to a student.
        plain = sampling.constraint is None and not sampling.logit_bias and not tools
        route = await routes.resolve(model, split=plain)
        if not route.engine.ready():
            raise ServiceUnavailableError("The engine is not ready.")
        engine_id = info.request_id if info.id_generated else uuid.uuid4().hex
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
            if route is not None:
                route.lease.release()
                if isinstance(exc, Exception):
                    _failed_before_start(gw, info, route, exc)
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
    )


def _failed_before_start(gw: Gateway, info: RequestInfo, route: Route, exc: Exception) -> None:
    """A routed request that failed before its first token: metrics and a failed record."""
    latency = time.perf_counter() - info.t_start
    model = route.engine.model_name
    if gw.metrics is not None:
        gw.metrics.observe_request(
            model, route.adapter, "error", 0, 0, None, latency, 0.0, info.key_id, info.endpoint
        )
    info.record(gw, model=model, route=route, latency_s=latency, error=to_api_error(exc).message)


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
    """What the encoders read: a :class:`Started` or a batch of them."""

    sampling: Sampling
    failed: bool

    def chunks(self) -> AsyncIterator[Chunk]: ...

    def aborted(self) -> None: ...

    async def aclose(self) -> None: ...


async def aggregate(started: Generation) -> Aggregate:
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
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        started.aborted()
        raise
    finally:
        await started.aclose()
    return agg


def usage_of(prompt_tokens: int, completion: list[int]) -> Usage:
    done = sum(completion)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
    )


async def stream_events(
    started: Generation,
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
            event = render(c)
            if event:
                yield event
        if usage_event is not None:
            yield usage_event(usage_of(prompt_tokens, completion))
    except (anyio.get_cancelled_exc_class(), GeneratorExit):
        started.aborted()
        raise
    except Exception as exc:
        started.failed = True
        yield sse_error(exc)
    finally:
        await started.aclose()
    yield DONE
