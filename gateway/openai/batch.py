"""Batched completion prompts (``prompt: ["a", "b"]``): one generation per prompt, run at
once, seen by the route as one generation whose choice ``k * n + i`` is prompt ``k``'s
``i``-th choice, as in OpenAI's API.

Each prompt is its own engine request with its own admission, metrics and prompt-log record
(request ids ``<id>``, ``<id>-1``, ``<id>-2``, ...), so the log keeps every prompt and its
answer. Usage and cost are the sums.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.engines.base import Chunk
from gateway.openai.accounting import cost_headers
from gateway.openai.serving import Started, start

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.engines.base import Sampling
    from gateway.openai.serving import RequestInfo
    from gateway.state import Gateway

__all__ = ["StartedBatch", "start_batch"]


@dataclass(slots=True)
class StartedBatch:
    """Several :class:`Started` generations behind the interface the encoders use."""

    parts: list[Started]
    sampling: Sampling
    """The request's sampling with ``n`` = prompts x choices."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.parts[0].id

    @property
    def created(self) -> int:
        return self.parts[0].created

    @property
    def model(self) -> str:
        return self.parts[0].model

    @property
    def failed(self) -> bool:
        return any(p.failed for p in self.parts)

    @failed.setter
    def failed(self, value: bool) -> None:
        for p in self.parts:
            p.failed = p.failed or value

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd for p in self.parts)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every part's chunks as they come, choice indexes shifted by ``k * n``; prompt
        tokens are the sum over the prompts seen so far."""
        n = self.parts[0].sampling.n
        queue: asyncio.Queue[tuple[int, Chunk | None, BaseException | None]] = asyncio.Queue()

        async def pump(k: int, part: Started) -> None:
            try:
                async for c in part.chunks():
                    await queue.put((k, c, None))
            except Exception as exc:
                await queue.put((k, None, exc))
                return
            await queue.put((k, None, None))

        self._tasks = [asyncio.create_task(pump(k, p)) for k, p in enumerate(self.parts)]
        prompt_tokens = [0] * len(self.parts)
        live = len(self.parts)
        try:
            while live:
                k, c, exc = await queue.get()
                if exc is not None:
                    raise exc
                if c is None:
                    live -= 1
                    continue
                prompt_tokens[k] = c.prompt_tokens
                yield dataclasses.replace(
                    c, index=k * n + c.index, prompt_tokens=sum(prompt_tokens)
                )
        finally:
            await self._stop()

    async def _stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def aborted(self, reason: str | None = None) -> None:
        for p in self.parts:
            p.aborted(reason)

    async def aclose(self) -> None:
        await self._stop()
        for p in self.parts:
            await p.aclose()

    def cost_headers(self) -> dict[str, str]:
        return cost_headers(self.cost_usd)


async def start_batch(
    gw: Gateway,
    infos: list[RequestInfo],
    model: str,
    *,
    sampling: Sampling,
    id_prefix: str,
) -> StartedBatch:
    """Start every prompt's generation; if one cannot start, the others are closed and its
    error is raised (a 4xx/5xx before any byte is sent)."""
    results = await asyncio.gather(
        *(start(gw, info, model, sampling=sampling, id_prefix=id_prefix) for info in infos),
        return_exceptions=True,
    )
    started = [r for r in results if isinstance(r, Started)]
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is not None:
        for s in started:
            s.aborted()
            await s.aclose()
        raise error
    started[0].id = f"{id_prefix}-{infos[0].request_id}"
    return StartedBatch(
        parts=started, sampling=dataclasses.replace(sampling, n=sampling.n * len(infos))
    )
