"""The teacher engine's bounded queue (``gateway.admission``)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from gateway.engines.base import EngineOverloadedError


async def test_admits_up_to_capacity_at_once_then_waits_in_order() -> None:
    adm = Admission(2, max_queue=4, max_wait_s=5)
    await adm.enter(1)
    await adm.enter(1)
    assert adm.running == 2
    order: list[str] = []

    async def wait(name: str) -> None:
        await adm.enter(1)
        order.append(name)

    a = asyncio.create_task(wait("a"))
    await asyncio.sleep(0)
    b = asyncio.create_task(wait("b"))
    await asyncio.sleep(0)
    assert adm.waiting == 2
    assert order == []
    adm.leave(1)
    await asyncio.sleep(0)
    assert order == ["a"]
    adm.leave(1)
    await asyncio.gather(a, b)
    assert order == ["a", "b"]
    assert (adm.running, adm.waiting) == (2, 0)


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    reasons: list[str] = []
    adm = Admission(1, max_queue=1, max_wait_s=2.5, on_reject=reasons.append)
    await adm.enter(1)
    waiter = asyncio.create_task(adm.enter(1))
    await asyncio.sleep(0)
    with pytest.raises(EngineOverloadedError) as info:
        await adm.enter(1)
    assert info.value.retry_after == 3
    assert reasons == ["full"]
    adm.leave(1)
    await waiter
    assert adm.running == 1


async def test_a_wait_past_the_bound_is_refused_and_leaves_the_queue() -> None:
    reasons: list[str] = []
    adm = Admission(1, max_queue=8, max_wait_s=0.05, on_reject=reasons.append)
    await adm.enter(1)
    with pytest.raises(EngineOverloadedError, match="capacity"):
        await adm.enter(1)
    assert reasons == ["timeout"]
    assert (adm.running, adm.waiting) == (1, 0)


async def test_a_cancelled_waiter_gives_its_place_to_the_next() -> None:
    adm = Admission(2, max_queue=8, max_wait_s=5)
    await adm.enter(2)
    big = asyncio.create_task(adm.enter(2))
    await asyncio.sleep(0)
    small = asyncio.create_task(adm.enter(1))
    await asyncio.sleep(0)
    adm.leave(1)  # one place: not enough for `big`, and `small` waits behind it (FIFO)
    await asyncio.sleep(0)
    assert not small.done()
    big.cancel()  # `big` gives up: `small` now fits
    await asyncio.wait_for(small, 1)
    assert (adm.running, adm.waiting) == (2, 0)


async def test_a_request_larger_than_capacity_runs_alone() -> None:
    adm = Admission(2, max_queue=0, max_wait_s=1)
    await adm.enter(3)
    assert adm.running == 3
    adm.leave(3)
    assert adm.running == 0


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Admission(0, max_queue=1, max_wait_s=1)
