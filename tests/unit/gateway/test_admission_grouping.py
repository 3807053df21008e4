"""Adapter-aware admission (``gateway.admission``, ``engine.adapter_group_max``): grouping,
the bound on added wait and fairness over synthetic traces, then the asyncio side."""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import random
from dataclasses import dataclass

import pytest

from gateway.admission import Admission, GroupPolicy, Waiter
from gateway.settings import EngineSettings

EPS = 1e-9


@dataclass
class Req:
    arrival: float
    adapter: str | None
    duration: float
    n: int = 1
    admitted: float | None = None


def simulate(policy: GroupPolicy, trace: list[Req]) -> list[tuple[float, frozenset[str]]]:
    """Drive ``policy`` as :class:`Admission` does, on a simulated clock: arrivals take the
    fast path when nothing waits, everything else waits and is picked at each event
    (arrival, completion, a grouping deadline). Returns the adapters running after each
    event, to measure grouping."""
    waiters: collections.deque[Waiter] = collections.deque()
    owner: dict[int, Req] = {}
    done: list[tuple[float, int, Req]] = []  # (finish time, seq, request)
    seq = 0
    pending = sorted(trace, key=lambda r: r.arrival)
    i = 0
    timeline: list[tuple[float, frozenset[str]]] = []

    def start(r: Req, now: float) -> None:
        nonlocal seq
        r.admitted = now
        seq += 1
        heapq.heappush(done, (now + r.duration, seq, r))

    now = 0.0
    while i < len(pending) or done or waiters:
        candidates = []
        if i < len(pending):
            candidates.append(pending[i].arrival)
        if done:
            candidates.append(done[0][0])
        deadline = policy.next_deadline(waiters, now)
        if deadline is not None:
            candidates.append(deadline)
        now = min(candidates)
        while done and done[0][0] <= now + EPS:
            _, _, r = heapq.heappop(done)
            policy.give(r.n, r.adapter)
        while i < len(pending) and pending[i].arrival <= now + EPS:
            r = pending[i]
            i += 1
            if not waiters and policy.fits(r.n) and policy.groups(r.adapter):
                policy.take(r.n, r.adapter)
                start(r, now)
            else:
                w = Waiter(r.n, r.adapter, now + policy.group_wait_s)
                owner[id(w)] = r
                waiters.append(w)
        for w in policy.pick(waiters, now + EPS):
            start(owner[id(w)], now)
        timeline.append((now, frozenset(policy.by_adapter)))
    return timeline


def poisson_trace(seed: int, adapters: int, rate: float, seconds: float) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while t < seconds:
        t += rng.expovariate(rate)
        name = f"a{rng.randrange(adapters)}" if rng.random() < 0.9 else None
        out.append(Req(t, name, rng.uniform(0.5, 3.0)))
    return out


def distinct_mean(timeline: list[tuple[float, frozenset[str]]]) -> float:
    """Time-weighted mean of distinct adapters running."""
    total = weight = 0.0
    for (t0, running), (t1, _) in itertools.pairwise(timeline):
        total += len(running) * (t1 - t0)
        weight += t1 - t0
    return total / weight


@pytest.mark.parametrize("seed", range(5))
def test_added_wait_never_exceeds_the_bound(seed: int) -> None:
    # Capacity never binds here, so any wait at all is grouping's, and bounded by it.
    trace = poisson_trace(seed, adapters=8, rate=6.0, seconds=60)
    simulate(GroupPolicy(10_000, max_adapters=1, group_wait_s=0.5), trace)
    waits = [r.admitted - r.arrival for r in trace if r.admitted is not None]
    assert len(waits) == len(trace)
    assert max(waits) <= 0.5 + 1e-6
    assert any(w > 0.1 for w in waits)  # grouping did hold some back
    assert all(r.admitted == r.arrival for r in trace if r.adapter is None)  # base: never


@pytest.mark.parametrize("seed", range(5))
def test_grouping_runs_fewer_adapters_at_once(seed: int) -> None:
    off = poisson_trace(seed, adapters=8, rate=6.0, seconds=60)
    on = poisson_trace(seed, adapters=8, rate=6.0, seconds=60)
    ungrouped = distinct_mean(simulate(GroupPolicy(10_000), off))
    # A bound comparable to the requests' run time (0.5-3 s) lets groups form.
    grouped = distinct_mean(simulate(GroupPolicy(10_000, max_adapters=2, group_wait_s=3.0), on))
    assert ungrouped > 4  # the trace does mix adapters
    assert grouped < 0.75 * ungrouped


def test_a_hot_adapter_does_not_starve_a_rare_one() -> None:
    # a0 arrives every 0.1 s and runs 1 s, so it is always running; a1 comes once.
    trace = [Req(0.1 * k, "a0", 1.0) for k in range(200)]
    rare = Req(5.05, "a1", 1.0)
    trace.append(rare)
    simulate(GroupPolicy(10_000, max_adapters=1, group_wait_s=0.3), trace)
    assert rare.admitted is not None
    assert rare.admitted - rare.arrival == pytest.approx(0.3)
    assert all(abs(r.admitted - r.arrival) < 1e-6 for r in trace if r.adapter == "a0")  # type: ignore[operator]


def test_every_adapter_gets_turns_under_capacity_pressure() -> None:
    # Capacity 4, 6 adapters arriving round-robin faster than the engine serves them:
    # each adapter's requests are all admitted, in arrival order within the adapter, and
    # the first of each waits no longer than capacity alone would make the queue wait
    # plus the grouping bound.
    trace = [Req(0.05 * k, f"a{k % 6}", 0.4) for k in range(120)]
    simulate(GroupPolicy(4, max_adapters=1, group_wait_s=0.2), trace)
    fifo = [Req(r.arrival, r.adapter, r.duration) for r in trace]
    simulate(GroupPolicy(4), fifo)
    for name in {r.adapter for r in trace}:
        mine = [r for r in trace if r.adapter == name]
        assert all(r.admitted is not None for r in mine)
        admits = [r.admitted for r in mine]
        assert admits == sorted(admits)  # type: ignore[type-var]
    grouped_wait = max(r.admitted - r.arrival for r in trace)  # type: ignore[operator]
    fifo_wait = max(r.admitted - r.arrival for r in fifo)  # type: ignore[operator]
    assert grouped_wait <= fifo_wait + 0.2 + 0.4 + 1e-6  # one more run at most, plus the bound


def test_capacity_still_bounds_and_orders_without_grouping() -> None:
    trace = [Req(0.0, f"a{k}", 1.0) for k in range(4)]
    simulate(GroupPolicy(2), trace)
    assert [r.admitted for r in trace] == [0.0, 0.0, 1.0, 1.0]


async def test_admission_groups_then_admits_at_the_bound() -> None:
    adm = Admission(8, max_queue=8, max_wait_s=5, group_adapters=1, group_wait_s=0.2)
    await adm.enter(1, "a")
    await adm.enter(1, "a")  # the running adapter: at once
    await adm.enter(1, None)  # the base model: at once
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    b = asyncio.create_task(adm.enter(1, "b"))
    await asyncio.sleep(0)
    assert not b.done()
    assert adm.waiting == 1
    adm.leave(1, "a")
    await asyncio.sleep(0)
    assert not b.done()  # "a" still runs one
    adm.leave(1, "a")  # "a" drained: "b" starts at once, well before its bound
    await asyncio.wait_for(b, 1)
    assert loop.time() - t0 < 0.2
    assert adm.policy.by_adapter == {"b": 1}

    c = asyncio.create_task(adm.enter(1, "c"))
    t1 = loop.time()
    await asyncio.wait_for(c, 2)  # "b" never leaves: "c" is admitted at its bound
    assert loop.time() - t1 >= 0.2 - 0.01
    assert adm.policy.by_adapter == {"b": 1, "c": 1}
    adm.leave(1, "b")
    adm.leave(1, "c")
    adm.leave(1, None)
    assert (adm.running, adm.waiting, adm.policy.by_adapter) == (0, 0, {})


async def test_a_cancelled_grouped_waiter_gives_nothing_away() -> None:
    adm = Admission(8, max_queue=8, max_wait_s=5, group_adapters=1, group_wait_s=1.0)
    await adm.enter(1, "a")
    b = asyncio.create_task(adm.enter(1, "b"))
    await asyncio.sleep(0)
    b.cancel()
    adm.leave(1, "a")  # wakes while "b" is cancelled but not yet unwound
    with pytest.raises(asyncio.CancelledError):
        await b
    assert (adm.running, adm.waiting, adm.policy.by_adapter) == (0, 0, {})


def test_grouping_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="below max_queue_wait_s"):
        EngineSettings(adapter_group_max=2, adapter_group_wait_s=30, max_queue_wait_s=30)
    with pytest.raises(ValueError, match=">= 0"):
        EngineSettings(adapter_group_max=-1)
    assert EngineSettings().adapter_group_max == 0
    with pytest.raises(ValueError, match="below max_wait_s"):
        Admission(4, max_queue=4, max_wait_s=1, group_adapters=1, group_wait_s=1)
