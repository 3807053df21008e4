"""Faults of the data services under load (issue 16, items 1-3), with the real services:
Postgres stopped and started under traffic (the prompt log waits in its queue, or in the
disk spool across a gateway SIGKILL), and Redis stopped and started under both
``limits.fail_open`` policies. The engine is not the point: gateways run the fake engine,
as real ``retort serve`` processes talked to with the official ``openai`` client.

``pytest -s`` prints one line per fault, the figures of BENCHMARKS.md's Faults table.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from loadtest.servers import (
    Redis,
    Server,
    free_port,
    gateway_spec,
    postgres_server,
    redis_instance,
)
from retort.db.schema import requests
from retort.db.store import PromptStore
from tests import waits
from tests.services import service

MODEL = "fake-model"
READY_S = 90.0
OUTAGE_S = 10.0
KEY = "sk-faults-0123456789abcdef"


# -- gateways --------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A ``retort serve`` process (fake engine) and what it needs to start again."""

    name: str
    root: Path
    config: dict[str, Any]
    server: Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def launch(self) -> Gateway:
        """Start (again, with the same home and config); wait with :meth:`ready`."""
        cfg = self.root / "retort.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        spec = gateway_spec(
            self.name, cfg, free_port(), env={"RETORT_HOME": str(self.root / "home")}
        )
        runs = len(list(self.root.glob("server*.log")))
        self.server = Server(spec, self.root / f"server{runs}.log")
        return self

    def ready(self) -> None:
        assert self.server is not None
        self.server.wait_ready(READY_S)

    def kill(self) -> None:
        """SIGKILL the whole process group: no drain, no flush."""
        assert self.server is not None
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(10)
        self.server.stop()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        raise AssertionError(f"{self.name}: no {name}{labels} in /metrics")

    def dropped(self) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "retort_promptlog_dropped_total"
        )


def gateway(tmp: Path, name: str, **sections: dict[str, Any]) -> Gateway:
    config: dict[str, Any] = {
        "model": {"served_name": MODEL},
        "engine": {"kind": "fake", "max_model_len": 2048},
        "server": {"log_level": "warning"},
    }
    config.update(sections)
    root = tmp / name
    (root / "home").mkdir(parents=True)
    return Gateway(name, root, config)


def start_all(*gws: Gateway) -> None:
    """Start together (imports overlap), then wait for each."""
    for gw in gws:
        gw.launch()
    for gw in gws:
        gw.ready()


# -- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """Paced requests to one gateway: which were served, which failed and how."""

    gw: Gateway
    prefix: str
    served: list[str] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)

    async def run(self, n: int, every_s: float, key: str = "unused") -> None:
        client = openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i * every_s - loop.time()))
            rid = f"{self.prefix}-{i}"
            start = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"request {i}"}],
                    max_tokens=8,
                    extra_headers={"x-request-id": rid},
                    timeout=30,
                )
            except openai.APIStatusError as exc:
                self.errors[f"{exc.status_code} {exc.body and exc.code}"] += 1
            except openai.APIError as exc:
                self.errors[f"{type(exc).__name__}: {exc.__cause__!r}"[:120]] += 1
            else:
                self.served.append(rid)
                self.latencies.append(time.perf_counter() - start)

        async with client:
            await asyncio.gather(*(one(i) for i in range(n)))

    def summary(self) -> str:
        lat = sorted(self.latencies)
        out = f"served {len(self.served)}, errors {dict(self.errors) or 0}"
        if lat:
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            out += f", p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
        return out


async def count_rows(store: PromptStore) -> collections.Counter[str]:
    """Rows of the prompt log per request id."""
    async with store.engine.connect() as conn:
        result = await conn.execute(sa.select(requests.c.request_id))
        return collections.Counter(rid for (rid,) in result)


async def wait_rows(store: PromptStore, ids: list[str], timeout_s: float = 60.0) -> float:
    """Seconds until every id in ``ids`` has a row (:class:`TimeoutError` after ``timeout_s``)."""
    t0 = time.monotonic()

    async def all_there() -> bool:
        rows = await count_rows(store)
        return all(rows[rid] for rid in ids)

    await waits.until(all_there, timeout_s, 0.1)
    return time.monotonic() - t0


# -- 1 and 2: Postgres stops and starts under load -----------------------------------------------


@dataclass
class Outage:
    queue: Load
    tiny: Load
    spool: Load
    rows: collections.Counter[str]
    tiny_dropped: float
    queue_recover_s: float
    spool_recover_s: float
    degraded_during: dict[str, float]


N = 200
EVERY_S = 0.06  # 200 requests over 12 s, the outage from 1 s to about 11 s
SPOOL_N = 100  # the spooled gateway serves the first 6 s, then is killed mid-outage


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    """One Postgres outage of ``OUTAGE_S`` under load on three gateways: ``queue`` (the
    defaults), ``tiny`` (a queue bound of about 20 records) and ``spool`` (spool: disk,
    SIGKILLed mid-outage, restarted once the database is back)."""
    tmp = tmp_path_factory.mktemp("pg-outage")
    with service(postgres_server()) as pg:
        log = {"flush_interval_s": 0.1, "retry_backoff_s": 0.1, "retry_max_backoff_s": 0.5}
        queue = gateway(tmp, "queue", promptlog={"url": pg.url, **log})
        tiny = gateway(tmp, "tiny", promptlog={"url": pg.url, "queue_max_bytes": 20_000, **log})
        spool = gateway(
            tmp, "spool", promptlog={"url": pg.url, "spool": "disk", "retries": 1, **log}
        )
        gws = (queue, tiny, spool)
        try:
            start_all(*gws)
            loads = Load(queue, "q"), Load(tiny, "t"), Load(spool, "s")
            degraded: dict[str, float] = {}
            marks: dict[str, float] = {}

            spool_done = threading.Event()

            failed: list[BaseException] = []

            def fault() -> None:
                time.sleep(1.0)  # the outage starts 1 s into the load
                pg.stop()
                marks["stopped"] = time.monotonic()
                try:
                    assert spool_done.wait(30), "the spool gateway's load did not finish"
                    for gw in gws:
                        degraded[gw.name] = gw.metric("retort_promptlog_degraded")
                    # Every record the spooled gateway accepted is on disk: kill it.
                    deadline = time.monotonic() + 5
                    while spool.metric("retort_promptlog_queue_depth") > 0:
                        assert time.monotonic() < deadline, "the spool gateway kept records"
                        time.sleep(0.05)
                    marks["spooled"] = spool.metric("retort_promptlog_spooled_total")
                    spool.kill()
                    time.sleep(max(0.0, marks["stopped"] + OUTAGE_S - time.monotonic()))
                except BaseException as exc:  # re-raised by the test's thread
                    failed.append(exc)
                finally:
                    pg.start()
                    marks["started"] = time.monotonic()

            faulter = threading.Thread(target=fault)
            faulter.start()

            async def spooled() -> None:
                try:
                    await loads[2].run(SPOOL_N, EVERY_S)
                finally:
                    spool_done.set()

            async def traffic() -> None:
                await asyncio.gather(loads[0].run(N, EVERY_S), loads[1].run(N, EVERY_S), spooled())

            asyncio.run(traffic())
            faulter.join()
            if failed:
                raise failed[0]
            assert marks["spooled"] > 0, "the spooled gateway spooled nothing"

            async def recovery() -> tuple[float, float, collections.Counter[str]]:
                async with PromptStore(pg.url) as store:
                    # The queue gateway writes what waited once the database is back.
                    await wait_rows(store, loads[0].served)
                    queued = time.monotonic() - marks["started"]
                    # The killed gateway, restarted, replays its spool.
                    await asyncio.to_thread(lambda: spool.launch().ready())
                    replayed = await wait_rows(store, loads[2].served)
                    return queued, replayed, await count_rows(store)

            queue_recover_s, spool_recover_s, rows = asyncio.run(recovery())
            tiny_dropped = tiny.dropped()
            yield Outage(
                *loads,
                rows=rows,
                tiny_dropped=tiny_dropped,
                queue_recover_s=queue_recover_s,
                spool_recover_s=spool_recover_s,
                degraded_during=degraded,
            )
        finally:
            for gw in gws:
                gw.stop()


def test_postgres_outage_loses_no_record_below_the_queue_bound(outage: Outage) -> None:
    load = outage.queue
    print(f"\nPostgres {OUTAGE_S:.0f} s outage, queue: {load.summary()}, "
          f"recovered {outage.queue_recover_s:.1f} s after the start")  # fmt: skip
    assert len(load.served) == N, load.errors
    assert outage.degraded_during["queue"] == 1
    lost = [rid for rid in load.served if outage.rows[rid] != 1]
    assert not lost, f"{len(lost)} records lost or duplicated: {lost[:5]}"
    assert load.gw.dropped() == 0
    assert load.gw.metric("retort_promptlog_degraded") == 0


def test_a_full_queue_drops_counted_records_and_still_serves(outage: Outage) -> None:
    load = outage.tiny
    written = sum(outage.rows[rid] for rid in load.served)
    print(f"\nPostgres outage, 20 kB queue: {load.summary()}, written {written}, "
          f"dropped (counted) {outage.tiny_dropped:.0f}")  # fmt: skip
    assert len(load.served) == N, load.errors  # the request path never blocked or failed
    assert outage.tiny_dropped > 0
    assert written + outage.tiny_dropped == N  # every record written or counted


def test_spool_survives_a_sigkill_mid_outage_exactly_once(outage: Outage) -> None:
    load = outage.spool
    accepted = load.served
    print(f"\nPostgres outage, spool + SIGKILL: {load.summary()}, replayed "
          f"{outage.spool_recover_s:.1f} s after the restarted gateway was ready")  # fmt: skip
    assert len(accepted) == SPOOL_N, load.errors  # killed after its last request
    assert outage.degraded_during["spool"] == 1
    counts = collections.Counter(outage.rows[rid] for rid in accepted)
    assert counts == {1: len(accepted)}, f"rows per accepted request: {counts}"
    assert load.gw.dropped() == 0
    assert not list((load.gw.root / "home" / "promptlog-spool").glob("*.jsonl"))


def test_postgres_down_when_the_gateway_starts_loses_no_record(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The database unreachable at start is an outage like any other: requests are served
    and logged from the first one (held in the queue), feedback is a 503 until the store
    opens, and every record reaches Postgres once it answers."""
    tmp = tmp_path_factory.mktemp("pg-down-at-start")
    n = 20
    with service(postgres_server()) as pg:
        pg.stop()
        log = {"flush_interval_s": 0.1, "retry_backoff_s": 0.1, "retry_max_backoff_s": 0.5}
        gw = gateway(tmp, "cold", promptlog={"url": pg.url, **log})
        try:
            start_all(gw)
            load = Load(gw, "cold")
            asyncio.run(load.run(n, 0.02))
            assert len(load.served) == n, load.errors
            asyncio.run(waits.until(lambda: gw.metric("retort_promptlog_degraded") == 1, 15, 0.05))
            assert gw.metric("retort_promptlog_queue_depth") == n
            r = httpx.post(
                gw.url + "/v1/feedback",
                json={"request_id": load.served[0], "score": 1.0},
                timeout=10,
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "promptlog_unavailable"
            pg.start()
            started = time.monotonic()

            async def landed() -> collections.Counter[str]:
                async with PromptStore(pg.url) as store:
                    await wait_rows(store, load.served)
                    return await count_rows(store)

            rows = asyncio.run(landed())
            took = time.monotonic() - started
            print(f"\nPostgres down at start: {load.summary()}, all {n} records written "
                  f"{took:.1f} s after it started")  # fmt: skip
            assert all(rows[rid] == 1 for rid in load.served), rows
            assert gw.dropped() == 0
            asyncio.run(waits.until(lambda: gw.metric("retort_promptlog_degraded") == 0, 15, 0.05))
            r = httpx.post(
                gw.url + "/v1/feedback",
                json={"request_id": load.served[0], "score": 1.0},
                timeout=10,
            )
            assert r.status_code == 201, r.text
        finally:
            gw.stop()


# -- 3: Redis stops and starts ---------------------------------------------------------------

RPM = 10


@pytest.fixture(scope="module")
def redis_gateways(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Redis, Gateway, Gateway]]:
    tmp = tmp_path_factory.mktemp("redis-outage")
    with service(redis_instance()) as redis:
        auth = {"api_keys": [{"id": "app", "sha256": hash_key(KEY), "rpm": RPM}]}
        limits = {"redis_url": redis.url, "probe_interval_s": 0.2}
        open_ = gateway(tmp, "open", auth=auth, limits={**limits, "key_prefix": "open"})
        closed = gateway(
            tmp, "closed", auth=auth, limits={**limits, "key_prefix": "closed", "fail_open": False}
        )
        try:
            start_all(open_, closed)
            yield redis, open_, closed
        finally:
            open_.stop()
            closed.stop()


def burst(gw: Gateway, prefix: str, n: int) -> Load:
    load = Load(gw, prefix)
    asyncio.run(load.run(n, 0.0, key=KEY))
    return load


def wait_degraded(gw: Gateway, value: float) -> float:
    t0 = time.monotonic()
    asyncio.run(waits.until(lambda: gw.metric("retort_limits_degraded") == value, 15, 0.05))
    return time.monotonic() - t0


def test_redis_outage_fail_open_keeps_every_key_limited(
    redis_gateways: tuple[Redis, Gateway, Gateway],
) -> None:
    redis, gw, _ = redis_gateways
    before = burst(gw, "o1", RPM + 3)  # shared through Redis
    assert len(before.served) == RPM, before.errors
    assert before.errors == {"429 rate_limit_exceeded": 3}
    redis.stop()
    try:
        during = burst(gw, "o2", RPM + 5)  # per replica: limited, never unlimited
        degraded = gw.metric("retort_limits_degraded")
    finally:
        redis.start()
    recovered_s = wait_degraded(gw, 0)
    after = burst(gw, "o3", RPM + 2)  # counted in the (fresh) Redis again, no restart
    print(f"\nRedis outage, fail_open: true: during {during.summary()}; after "
          f"{after.summary()}; shared again {recovered_s:.1f} s after Redis started")  # fmt: skip
    assert degraded == 1
    assert len(during.served) == RPM, during.errors
    assert during.errors == {"429 rate_limit_exceeded": 5}
    assert len(after.served) == RPM, after.errors
    assert after.errors == {"429 rate_limit_exceeded": 2}


def test_redis_outage_fail_closed_refuses_with_503_until_it_returns(
    redis_gateways: tuple[Redis, Gateway, Gateway],
) -> None:
    redis, _, gw = redis_gateways
    assert len(burst(gw, "c1", 2).served) == 2
    redis.stop()
    try:
        during = burst(gw, "c2", 3)
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        degraded = gw.metric("retort_limits_degraded")
    finally:
        redis.start()
    recovered_s = wait_degraded(gw, 0)
    after = burst(gw, "c3", 2)
    print(f"\nRedis outage, fail_open: false: during {during.summary()}; after "
          f"{after.summary()}; back {recovered_s:.1f} s after Redis started")  # fmt: skip
    assert degraded == 1
    assert during.served == []
    assert during.errors == {"503 limiter_unavailable": 3}
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "limiter_unavailable"
    assert len(after.served) == 2, after.errors
