"""Overload admission for the teacher engine: at most ``capacity`` sequences in the engine,
a bounded FIFO of waiting requests, and a bounded wait; optionally, adapter grouping.

vLLM queues whatever it is given (its waiting queue has no bound), so under overload every
request would wait longer and longer. Here a request whose sequences fit is admitted at once
(an integer compare: the hot path costs nothing more); otherwise it waits in a FIFO of at
most ``max_queue`` sequences for at most ``max_wait_s``. A full queue, or a wait past the
bound, is refused with :class:`~gateway.engines.base.EngineOverloadedError` (HTTP 503 with
``Retry-After``). Students have the same in their batcher (``students.max_queue``).

**Adapter grouping** (``group_adapters`` > 0, ``engine.adapter_group_max``): at most that
many distinct LoRA adapters run in the engine at once, so requests of the same adapter
share engine steps. A request for an adapter not running while the limit is reached waits
(base-model requests never do) until one of the running adapters drains, but for at most
``group_wait_s`` beyond what capacity alone would make it wait: past that it is admitted
like any other request (the bound on added wait, so no adapter starves). Waiters are
served in arrival order among those that may run, so a later request of a running adapter
may pass an earlier one of another adapter, never past the other's bound.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.engines.base import EngineOverloadedError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Admission", "GroupPolicy", "Waiter"]


@dataclass(slots=True, eq=False)
class Waiter:
    """One request waiting for places: ``n`` sequences of ``adapter`` (``None``: base)."""

    n: int
    adapter: str | None
    deadline: float
    """When its added wait for grouping runs out (``arrival + group_wait_s``)."""
    fut: asyncio.Future[None] | None = None


class GroupPolicy:
    """Which requests may run: capacity, and at most ``max_adapters`` distinct adapters
    running (0: no adapter limit). Pure bookkeeping, no clock of its own, so synthetic
    traces can drive it (tests) as :class:`Admission` does."""

    __slots__ = ("by_adapter", "capacity", "group_wait_s", "max_adapters", "running")

    def __init__(self, capacity: int, max_adapters: int = 0, group_wait_s: float = 0.0) -> None:
        if capacity < 1 or max_adapters < 0 or group_wait_s < 0:
            raise ValueError("capacity must be >= 1, max_adapters and group_wait_s >= 0")
        self.capacity = capacity
        self.max_adapters = max_adapters
        self.group_wait_s = group_wait_s
        self.running = 0
        """Sequences admitted and not released yet."""
        self.by_adapter: dict[str, int] = {}
        """Running sequences per adapter (base-model sequences are not counted here)."""

    def fits(self, n: int) -> bool:
        """Capacity alone; a request larger than the whole capacity runs alone."""
        return self.running + n <= self.capacity or self.running == 0

    def groups(self, adapter: str | None) -> bool:
        """Whether ``adapter`` may start now under the distinct-adapter limit."""
        if adapter is None or self.max_adapters == 0:
            return True
        by = self.by_adapter
        return adapter in by or len(by) < self.max_adapters

    def take(self, n: int, adapter: str | None) -> None:
        self.running += n
        if adapter is not None:
            self.by_adapter[adapter] = self.by_adapter.get(adapter, 0) + n

    def give(self, n: int, adapter: str | None) -> None:
        self.running -= n
        if adapter is not None:
            left = self.by_adapter[adapter] - n
            if left > 0:
                self.by_adapter[adapter] = left
            else:
                del self.by_adapter[adapter]

    def pick(self, waiters: collections.deque[Waiter], now: float) -> list[Waiter]:
        """Take places for the waiters that may start now, in arrival order, and remove
        them from ``waiters``. A waiter blocked by capacity alone stops the scan (FIFO: no
        smaller request passes it); one held back by grouping is skipped."""
        started: list[Waiter] = []
        for w in list(waiters):
            if w.fut is not None and w.fut.done():
                continue  # cancelled: its own task removes it
            if not self.fits(w.n):
                break
            if now >= w.deadline or self.groups(w.adapter):
                waiters.remove(w)
                self.take(w.n, w.adapter)
                started.append(w)
        return started

    def next_deadline(self, waiters: collections.deque[Waiter], now: float) -> float | None:
        """The earliest deadline still to come among waiters held back by grouping (one
        already past waits for capacity, and a :meth:`give` wakes it)."""
        held = [w.deadline for w in waiters if w.deadline > now and not self.groups(w.adapter)]
        return min(held) if held else None


class Admission:
    """Sequences running in one engine, and those waiting for a place."""

    __slots__ = ("_timer", "_waiters", "max_queue", "max_wait_s", "on_reject", "policy")

    def __init__(
        self,
        capacity: int,
        *,
        max_queue: int,
        max_wait_s: float,
        on_reject: Callable[[str], None] | None = None,
        group_adapters: int = 0,
        group_wait_s: float = 0.0,
    ) -> None:
        """
        Args:
            capacity: sequences the engine runs at once (its ``max_num_seqs``).
            max_queue: sequences that may wait beyond it; more are refused at once.
            max_wait_s: how long a request may wait for a place before it is refused.
            on_reject: called with ``"full"`` or ``"timeout"`` for each refusal (a metric).
            group_adapters: distinct adapters running at once (0: no grouping).
            group_wait_s: the most a request waits for grouping (below ``max_wait_s``).
        """
        if capacity < 1 or max_queue < 0 or max_wait_s < 0:
            raise ValueError("capacity must be >= 1, max_queue and max_wait_s >= 0")
        if group_adapters and group_wait_s >= max_wait_s:
            raise ValueError("group_wait_s must be below max_wait_s (a grouped wait is no 503)")
        self.policy = GroupPolicy(capacity, group_adapters, group_wait_s)
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.on_reject = on_reject
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    @property
    def running(self) -> int:
        """Sequences admitted and not released yet."""
        return self.policy.running

    @property
    def waiting(self) -> int:
        """Sequences waiting for a place."""
        return sum(w.n for w in self._waiters)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.max_wait_s))

    def _refuse(self, reason: str, message: str) -> EngineOverloadedError:
        if self.on_reject is not None:
            self.on_reject(reason)
        return EngineOverloadedError(message, retry_after=self._retry_after())

    async def enter(self, n: int, adapter: str | None = None) -> None:
        """Take places for ``n`` sequences of ``adapter`` (``None``: the base model),
        waiting (bounded) if the engine is full or, with grouping, if other adapters hold
        the engine; pair with :meth:`leave` (same ``adapter``)."""
        policy = self.policy
        if not self._waiters and policy.fits(n) and policy.groups(adapter):
            policy.take(n, adapter)
            return
        if self.waiting + n > self.max_queue:
            raise self._refuse(
                "full",
                f"The engine is at capacity ({self.capacity} sequences running, "
                f"{self.waiting} waiting); retry later.",
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        w = Waiter(n, adapter, loop.time() + policy.group_wait_s, fut)
        self._waiters.append(w)
        self._wake()  # grouping only (capacity free): may start at once or arm the timer
        try:
            async with asyncio.timeout(self.max_wait_s):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.leave(n, adapter)  # granted just as the wait ended: give it back
            else:
                fut.cancel()
                self._waiters.remove(w)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise self._refuse(
                    "timeout",
                    f"The engine stayed at capacity for {self.max_wait_s:g} s; retry later.",
                ) from None
            raise

    def leave(self, n: int, adapter: str | None = None) -> None:
        """Give back ``n`` places, admitting waiters in order while they may start."""
        self.policy.give(n, adapter)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for w in self.policy.pick(self._waiters, now):
            assert w.fut is not None
            if not w.fut.done():
                w.fut.set_result(None)
        if self.policy.max_adapters == 0:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.policy.next_deadline(self._waiters, now)
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._waiters:
            self._wake()
