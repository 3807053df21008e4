"""Send one request with ``httpx`` and time it: first text chunk, every chunk gap, the end."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx

from loadtest.sse import DONE, SSEDecoder
from loadtest.stats import RequestResult

if TYPE_CHECKING:
    from loadtest.dataset import Endpoint

__all__ = ["PATHS", "StreamAccumulator", "make_client", "send_request"]

PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_BODY_CHARS = 300


def make_client(base_url: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP/1.1 keep-alive client with one pooled connection per concurrent worker."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        http1=True,
        http2=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
    )


def _choice_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return str(delta.get("content") or "")
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


class StreamAccumulator:
    """Accumulates one streamed response: text, token counts and chunk times."""

    def __init__(self, result: RequestResult, t0: float) -> None:
        self.result = result
        self.t0 = t0
        self.parts: list[str] = []
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.last: float | None = None

    def event(self, data: str, now: float) -> None:
        if data == DONE:
            return
        event = json.loads(data)
        if "error" in event:
            self.result.error = f"stream error: {json.dumps(event['error'])[:ERROR_BODY_CHARS]}"
            return
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        text = "".join(_choice_text(c) for c in event.get("choices") or [])
        if not text:
            return
        self.chunks += 1
        self.parts.append(text)
        if self.last is None:
            self.result.ttft_s = now - self.t0
        else:
            self.result.itl_s.append(now - self.last)
        self.last = now

    def finish(self) -> None:
        r = self.result
        r.text = "".join(self.parts)
        r.output_tokens = self.usage_tokens if self.usage_tokens is not None else self.chunks
        r.ok = r.error is None


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], result: RequestResult, t0: float
) -> None:
    decoder = SSEDecoder()
    state = StreamAccumulator(result, t0)
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            result.error = f"HTTP {resp.status_code}: {text[:ERROR_BODY_CHARS]}"
            return
        async for raw in resp.aiter_bytes():
            now = time.perf_counter()
            for data in decoder.feed(raw):
                state.event(data, now)
    for data in decoder.flush():
        state.event(data, time.perf_counter())
    state.finish()


async def _plain(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], result: RequestResult, t0: float
) -> None:
    resp = await client.post(path, json=body)
    if resp.status_code != 200:
        result.error = f"HTTP {resp.status_code}: {resp.text[:ERROR_BODY_CHARS]}"
        return
    data = resp.json()
    result.ttft_s = time.perf_counter() - t0
    result.text = "".join(_choice_text(c) for c in data.get("choices") or [])
    usage = data.get("usage") or {}
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.ok = True


async def send_request(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    body: dict[str, Any],
    *,
    clock_zero: float = 0.0,
    probe: bool = False,
) -> RequestResult:
    """Send ``body``; never raises for HTTP or network errors (they land in ``error``)."""
    result = RequestResult(model=str(body["model"]), streamed=bool(body.get("stream")), probe=probe)
    t0 = time.perf_counter()
    result.start_s = t0 - clock_zero
    try:
        if result.streamed:
            await _stream(client, PATHS[endpoint], body, result, t0)
        else:
            await _plain(client, PATHS[endpoint], body, result, t0)
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
    result.e2e_s = time.perf_counter() - t0
    return result
