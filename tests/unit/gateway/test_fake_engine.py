"""The fake engine's capacity: at most ``max_num_seqs`` running, the rest waiting (as vLLM's
scheduler), reported through ``stats()`` like vLLM's running/waiting counts."""

from __future__ import annotations

import asyncio

from gateway.engines.base import BoundedEngine, GenerateRequest, Sampling
from gateway.engines.fake import FakeEngine
from gateway.metrics import ReportsStats


async def _drain(engine: FakeEngine, rid: str, started: asyncio.Event) -> None:
    req = GenerateRequest(rid, prompt="hi", sampling=Sampling(max_tokens=3))
    async for _ in engine.generate(req):
        started.set()


async def test_runs_at_most_max_num_seqs_and_queues_the_rest() -> None:
    engine = FakeEngine("m", 64, token_delay_s=0.05, max_num_seqs=2)
    assert isinstance(engine, BoundedEngine)
    assert isinstance(engine, ReportsStats)
    assert engine.max_num_seqs == 2
    events = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(_drain(engine, f"r{i}", e)) for i, e in enumerate(events)]
    await asyncio.wait_for(asyncio.gather(events[0].wait(), events[1].wait()), 5)
    assert (engine.stats().running, engine.stats().waiting) == (2, 1)
    assert not events[2].is_set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)


async def test_an_aborted_request_gives_its_place_back() -> None:
    engine = FakeEngine("m", 64, token_delay_s=0.05, max_num_seqs=1)
    req = GenerateRequest("a", prompt="hi", sampling=Sampling(max_tokens=50))
    it = engine.generate(req).__aiter__()
    await it.__anext__()
    assert engine.running == 1
    await it.aclose()  # type: ignore[attr-defined]  # the client went away
    assert engine.aborted == ["a"]
    assert engine.running == 0
    done = asyncio.Event()
    await asyncio.wait_for(_drain(engine, "b", done), 5)  # the place is free again
    assert done.is_set()


async def test_without_a_bound_nothing_waits() -> None:
    engine = FakeEngine("m", 64)
    assert engine.max_num_seqs is None
    events = [asyncio.Event() for _ in range(5)]
    await asyncio.gather(*(_drain(engine, f"r{i}", e) for i, e in enumerate(events)))
    assert all(e.is_set() for e in events)
