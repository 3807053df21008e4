"""A small deterministic engine for unit tests and the gateway-overhead benchmark.

It "tokenizes" on whitespace and answers with a fixed sentence, cycled up to the budget.
It honours ``n``, ``max_tokens``, ``stop``, ``logprobs`` and the context length, so the
gateway's protocol paths can be exercised without a model. Never used to serve users.
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

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["FakeEngine"]

ANSWER = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."]


class FakeEngine(ServedModel):
    def __init__(
        self,
        model_name: str = "fake-model",
        max_model_len: int = 2048,
        token_delay_s: float = 0.0,
        default_max_tokens: int = 16,
    ) -> None:
        self._name = model_name
        self._max_len = max_model_len
        self._delay = token_delay_s
        self._default_max = default_max_tokens
        self._adapters: dict[str, str] = {}
        self._dead = False
        self.aborted: list[str] = []

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
        try:
            for step in range(budget):
                if self._delay:
                    await asyncio.sleep(self._delay)
                if self._dead:
                    raise EngineDeadError("engine died mid-request")
                for i in range(s.n):
                    if done[i]:
                        continue
                    word = ANSWER[(step + i) % len(ANSWER)]
                    text = word if step == 0 else " " + word
                    finish = "length" if step == budget - 1 else None
                    if any(word == st.strip() for st in s.stop):
                        text, finish = "", "stop"
                    lp = None
                    if s.logprobs is not None:
                        top = [(w, -0.1 * (j + 1)) for j, w in enumerate(ANSWER[: s.logprobs])]
                        lp = [TokenLogprob(token=text, logprob=-0.05, top=top)]
                    if finish:
                        done[i] = True
                    yield Chunk(i, text, n_prompt, step + 1, finish, lp if text else None)
            if budget == 0:
                for i in range(s.n):
                    yield Chunk(i, "", n_prompt, 0, "length")
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request.request_id)
            raise

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
