"""Request accounting: who asked for what, and what it cost, once the generation ends.

:class:`RequestInfo` gathers a request's identity and log fields before generation;
:class:`Started` counts a generation's chunks and, when it is closed (finished, failed or
abandoned), aborts the engine request if unfinished, then observes the metrics, prices it,
queues its prompt-log record and releases its holds (key limits, adapter lease, drain).
How the response is encoded (JSON, SSE) is not its business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gateway.engines.base import plain_sampling
from gateway.errors import to_api_error
from gateway.openai.protocol import Usage
from gateway.promptlog.policy import LOG_HEADER, TAGS_HEADER, parse_tags
from gateway.requestid import header, request_id
from retort.db.record import LogRecord

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar.types import Scope

    from gateway.admission import Admission
    from gateway.auth.keys import KeyInfo
    from gateway.auth.limits import LimitLease
    from gateway.engines.base import Chunk, Sampling
    from gateway.openai.protocol import SamplingFields
    from gateway.routing import Route
    from gateway.state import Gateway

__all__ = [
    "COST_HEADER",
    "ENDPOINT_STATE",
    "KEY_STATE",
    "RequestInfo",
    "Started",
    "cost_headers",
    "failed_before_start",
    "request_info",
    "strip_id_prefix",
    "usage_of",
]

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
    scope: Scope,
    endpoint: Literal["chat", "completions"],
    data: SamplingFields,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt: str | list[int] | None = None,
) -> RequestInfo:
    """Gather the request's identity and log fields (cheap when it is not captured)."""
    state = scope.setdefault("state", {})
    rid = request_id(scope)
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
    if plog is not None and plog.should_capture(rid, info.key_id, header(scope, LOG_HEADER)):
        info.capture = True
        info.params = {
            k: v
            for k, v in msgspec.structs.asdict(data).items()
            if v is not None and k not in _NOT_PARAMS
        }
        if info.params:
            info.params = msgspec.to_builtins(info.params)
        info.tags = parse_tags(header(scope, TAGS_HEADER), data.metadata)
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
    admission: Admission | None = None
    """The engine places this generation holds (``sampling.n``), given back when closed."""
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
            self.fail(exc)
            raise

    def fail(self, exc: Exception) -> None:
        """The engine raised ``exc`` mid-generation."""
        self.failed = True
        self.error = to_api_error(exc).message

    def _count(self, c: Chunk) -> None:
        # Inlined in the fused loops of gateway.openai.serving (aggregate, frames): the same.
        self.prompt_tokens = c.prompt_tokens
        self.completion[c.index] = c.completion_tokens
        if c.index == 0:
            if self.texts is not None:
                self.texts.append(c.text)
            if c.finish_reason is not None:
                self.finish_reason = c.finish_reason

    def aborted(self, reason: str | None = None) -> None:
        """The client went away (or stopped reading: ``reason``) before the end."""
        if not self.failed:
            self.failed = True
            self.error = reason or "the client disconnected before the end"

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
                if self.info.capture:  # the prompt log, and shadowing of what it logs
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
                        gw.shadow.submit(
                            record,
                            self.sampling,
                            shadowable=plain_sampling(self.sampling)
                            and "tools" not in record.params,
                        )
            finally:
                if self.admission is not None:
                    self.admission.leave(self.sampling.n, route.adapter)
                route.lease.release()
                gw.request_finished()
                await self.limit.release(self.prompt_tokens + completion_tokens)

    def cost_headers(self) -> dict[str, str]:
        return cost_headers(self.cost_usd)


def cost_headers(cost_usd: float) -> dict[str, str]:
    """The ``x-retort-cost-usd`` header of a non-streamed response."""
    return {COST_HEADER: f"{cost_usd:.10f}".rstrip("0").rstrip(".") or "0"}


def failed_before_start(gw: Gateway, info: RequestInfo, route: Route, exc: Exception) -> None:
    """A routed request that failed before its first token: metrics and a failed record."""
    latency = time.perf_counter() - info.t_start
    model = route.engine.model_name
    if gw.metrics is not None:
        gw.metrics.observe_request(
            model, route.adapter, "error", 0, 0, None, latency, 0.0, info.key_id, info.endpoint
        )
    info.record(gw, model=model, route=route, latency_s=latency, error=to_api_error(exc).message)


def usage_of(prompt_tokens: int, completion: list[int]) -> Usage:
    done = sum(completion)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done
    )
