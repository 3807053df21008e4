"""Waiting on a condition, never for a fixed time: poll until it holds or the time is up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["until"]


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0, every_s: float = 0.01
) -> None:
    """Return as soon as ``condition()`` holds; :class:`TimeoutError` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = condition()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"condition still false after {timeout_s}s")
        await asyncio.sleep(every_s)
