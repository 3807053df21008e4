"""Overload admission for the teacher engine: at most ``capacity`` sequences in the engine,
a bounded FIFO of waiting requests, and a bounded wait.

vLLM queues whatever it is given (its waiting queue has no bound), so under overload every
request would wait longer and longer. Here a request whose sequences fit is admitted at once
(an integer compare: the hot path costs nothing more); otherwise it waits in a FIFO of at
most ``max_queue`` sequences for at most ``max_wait_s``. A full queue, or a wait past the
bound, is refused with :class:`~gateway.engines.base.EngineOverloadedError` (HTTP 503 with
``Retry-After``). Students have the same in their batcher (``students.max_queue``).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import TYPE_CHECKING

from gateway.engines.base import EngineOverloadedError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Admission"]


class Admission:
    """Sequences running in one engine, and those waiting for a place."""

    __slots__ = ("_waiters", "capacity", "max_queue", "max_wait_s", "on_reject", "running")

    def __init__(
        self,
        capacity: int,
        *,
        max_queue: int,
        max_wait_s: float,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        """
        Args:
            capacity: sequences the engine runs at once (its ``max_num_seqs``).
            max_queue: sequences that may wait beyond it; more are refused at once.
            max_wait_s: how long a request may wait for a place before it is refused.
            on_reject: called with ``"full"`` or ``"timeout"`` for each refusal (a metric).
        """
        if capacity < 1 or max_queue < 0 or max_wait_s < 0:
            raise ValueError("capacity must be >= 1, max_queue and max_wait_s >= 0")
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.on_reject = on_reject
        self.running = 0
        """Sequences admitted and not released yet."""
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Sequences waiting for a place."""
        return sum(n for n, _ in self._waiters)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.max_wait_s))

    def _refuse(self, reason: str, message: str) -> EngineOverloadedError:
        if self.on_reject is not None:
            self.on_reject(reason)
        return EngineOverloadedError(message, retry_after=self._retry_after())

    async def enter(self, n: int) -> None:
        """Take places for ``n`` sequences, waiting (bounded) if the engine is full; pair
        with :meth:`leave`. A request larger than the whole capacity runs alone."""
        running = self.running
        if not self._waiters and (running + n <= self.capacity or running == 0):
            self.running = running + n
            return
        if self.waiting + n > self.max_queue:
            raise self._refuse(
                "full",
                f"The engine is at capacity ({self.capacity} sequences running, "
                f"{self.waiting} waiting); retry later.",
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.max_wait_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.leave(n)  # granted just as the wait ended: give the place back
            else:
                fut.cancel()
                self._waiters.remove(entry)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    "timeout",
                    f"The engine stayed at capacity for {self.max_wait_s:g} s; retry later.",
                ) from None
            raise

    def leave(self, n: int) -> None:
        """Give back ``n`` places, admitting waiters in order while they fit."""
        self.running -= n
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, fut = waiters[0]
            if self.running + n > self.capacity and self.running > 0:
                return
            waiters.popleft()
            self.running += n
            fut.set_result(None)
