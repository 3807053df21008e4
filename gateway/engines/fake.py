"""A small deterministic engine for unit tests and the gateway-overhead benchmark.

It "tokenizes" on whitespace and answers with a fixed sentence, cycled up to the budget.
It honours ``n``, ``max_tokens``, ``stop``, ``logprobs`` and the context length, so the
gateway's protocol paths can be exercised without a model. Like vLLM it runs at most
``max_num_seqs`` sequences at once (more wait, unbounded, in its queue), reports its running
and waiting requests, and sends the first token at once, then one every ``token_delay_s``.
Never used to serve users.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.engines.base import (
    Chunk,
    EngineDeadError,
    GenerateRequest,
    PromptTooLongError,
    ServedModel,
    TokenLogprob,
    refuse_unsupported,
)
from gateway.metrics import EngineStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["FakeEngine"]

ANSWER = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]
_SPACED = [" " + w for w in ANSWER]


class FakeEngine(ServedModel):
    def __init__(
        self,
        model_name: str = "fake-model",
        max_model_len: int = 2048,
        token_delay_s: float = 0.0,
        default_max_tokens: int = 16,
        max_num_seqs: int | None = None,
    ) -> None:
        self._name = model_name
        self._max_len = max_model_len
        self._delay = token_delay_s
        self._default_max = default_max_tokens
        self._adapters: dict[str, str] = {}
        self._dead = False
        self.aborted: list[str] = []
        self._max_seqs = max_num_seqs
        self._slots = asyncio.Semaphore(max_num_seqs) if max_num_seqs is not None else None
        self.running = 0
        """Requests generating now."""
        self.waiting = 0
        """Requests waiting for a place (past ``max_num_seqs``)."""

    @property
    def max_num_seqs(self) -> int | None:
        """Sequences run at once; ``None``: no bound."""
        return self._max_seqs

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting=self.waiting, kv_cache_usage=0.0)

    def kill(self) -> None:
        """Simulate the engine process dying."""
        self._dead = True

    def prompt_tokens(self, request: GenerateRequest) -> int:
        if request.messages is not None:
            words = sum(len(m["content"].split()) + 2 for m in request.messages)
            return words + 1
        if isinstance(request.prompt, list):
            return len(request.prompt)
        return len((request.prompt or "").split())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self._dead:
            raise EngineDeadError("engine is dead")
        refuse_unsupported(request, "the fake engine")
        n_prompt = self.prompt_tokens(request)
        if n_prompt >= self._max_len:
            raise PromptTooLongError(n_prompt, self._max_len)
        s = request.sampling
        budget = self._max_len - n_prompt
        if s.max_tokens is not None:
            budget = min(budget, s.max_tokens)
        if s.max_tokens is None:
            budget = min(budget, self._default_max)
        done = [False] * s.n
        slots = self._slots
        taken = 0
        running = False
        try:
            if slots is not None:
                self.waiting += 1
                try:
                    for _ in range(min(s.n, self._max_seqs or 1)):
                        await slots.acquire()
                        taken += 1
                finally:
                    self.waiting -= 1
            self.running += 1
            running = True
            # Per token only what varies: the stop words and the logprobs' top list are
            # worked out once (the benchmark's engine should cost next to nothing).
            stops = {st.strip() for st in s.stop}
            top = (
                [(w, -0.1 * (j + 1)) for j, w in enumerate(ANSWER[: s.logprobs])]
                if s.logprobs is not None
                else None
            )
            last = budget - 1
            for step in range(budget):
                if self._delay and step:
                    await asyncio.sleep(self._delay)
                if self._dead:
                    raise EngineDeadError("engine died mid-request")
                words = ANSWER if step == 0 else _SPACED
                finish = "length" if step == last else None
                for i in range(s.n):
                    if done[i]:
                        continue
                    k = (step + i) % len(ANSWER)
                    if stops and ANSWER[k] in stops:
                        done[i] = True
                        yield Chunk(i, "", n_prompt, step + 1, "stop")
                        continue
                    text = words[k]
                    lp = None
                    if top is not None:
                        lp = [TokenLogprob(token=text, logprob=-0.05, top=list(top))]
                    if finish:
                        done[i] = True
                    yield Chunk(i, text, n_prompt, step + 1, finish, lp)
            if budget == 0:
                for i in range(s.n):
                    yield Chunk(i, "", n_prompt, 0, "length")
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request.request_id)
            raise
        finally:
            if running:
                self.running -= 1
            if slots is not None:
                for _ in range(taken):
                    slots.release()

    async def load_adapter(self, name: str, path: str) -> None:
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def ready(self) -> bool:
        return not self._dead

    def dead(self) -> bool:
        return self._dead

    async def close(self) -> None:
        return None
