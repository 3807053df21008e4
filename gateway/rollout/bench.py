"""What one rollout evaluation costs the database: ``python -m gateway.rollout.bench [URL]``.

Fills a fresh database (SQLite in a temp folder when no URL is given) with a stage's rows
(shadow pairs, the teacher's and the student's answers) and times
:meth:`RolloutService.evaluate` (three queries per live rollout, then the pure policy), and
the split lookup a request makes. Also what shadowing adds to a request's own path:
:meth:`ShadowRunner.submit` as the request's accounting calls it (the choice by request id,
the in-flight bound, the background task created), taken sampled, not sampled and dropped;
the shadow's own work runs later, in that task.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from gateway.rollout.policy import RolloutPolicy
from gateway.rollout.service import RolloutService, RolloutSettings
from retort.db.record import LogRecord
from retort.db.rollouts import RolloutStore
from retort.db.store import PromptStore

__all__ = ["evaluate_cost", "submit_cost"]

TEACHER, STUDENT = "bench-model", "bench-student"


def _record(t: float, served_by: Literal["engine", "student"]) -> LogRecord:
    return LogRecord(
        request_id=uuid.uuid4().hex,
        created=t,
        model=TEACHER if served_by == "engine" else STUDENT,
        endpoint="chat",
        served_by=served_by,
        messages=[{"role": "user", "content": "How long is a piece of string?"}],
        completion="Twice half its length.",
        prompt_tokens=12,
        completion_tokens=6,
        latency_s=0.4 if served_by == "engine" else 0.05,
        cost_usd=2e-5 if served_by == "engine" else 2e-6,
    )


def _pair(t: float, i: int) -> dict[str, Any]:
    return {
        "request_id": uuid.uuid4().hex,
        "created": t,
        "teacher": TEACHER,
        "student": STUDENT,
        "measure": "exact",
        "score": 1.0 if i % 20 else 0.0,
        "agree": bool(i % 20),
        "outcome": "agree" if i % 20 else "disagree",
        "teacher_text": "Twice half its length.",
        "student_text": "Twice half its length.",
        "teacher_latency_s": 0.4,
        "student_latency_s": 0.05,
        "teacher_cost_usd": 2e-5,
        "student_cost_usd": 2e-6,
        "student_tokens": 6,
        "error": None,
    }


async def evaluate_cost(
    url: str, *, pairs: int = 5000, teacher: int = 10000, student: int = 1000, runs: int = 7
) -> dict[str, Any]:
    """Median seconds of one evaluation and of one split lookup, over a stage of that size."""
    async with PromptStore(url) as store:
        svc = RolloutService(
            RolloutSettings(policy=RolloutPolicy(min_stage_s=1e9)), RolloutStore(store.engine)
        )
        r, _ = await svc.operate("start", TEACHER, student=STUDENT)
        t = r.stage_since + 1
        await store.insert_many([_record(t, "engine") for _ in range(teacher)])
        await store.insert_many([_record(t, "student") for _ in range(student)])
        await store.insert_shadow([_pair(t, i) for i in range(pairs)])
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ((_, decision),) = await svc.evaluate(now=t + 1)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(100_000):
            svc.split(TEACHER)
        lookup = (time.perf_counter() - t0) / 100_000
    return {
        "evaluate_s": statistics.median(times),
        "decision": decision.rule,
        "split_lookup_s": lookup,
        "pairs": pairs,
        "teacher_answers": teacher,
        "student_answers": student,
    }


async def submit_cost(url: str, batches: int = 300, batch: int = 100) -> dict[str, float]:
    """Seconds per :meth:`ShadowRunner.submit` call, as the request's accounting makes it:
    sampled (share 1: a task is created), not sampled (share 0.2, the 80% the hash leaves
    out), and dropped (the student's ``max_inflight`` reached: counted). Timed in batches of
    ``batch`` calls, the median batch (a shared machine preempts some); the created tasks
    are cancelled before they run, so what is timed is the request path's part alone."""
    from prometheus_client import CollectorRegistry

    from gateway.engines.base import Sampling, plain_sampling
    from gateway.metrics import Metrics
    from gateway.shadow import ShadowRunner, ShadowSettings, ShadowTarget
    from gateway.studentpool import StudentPool
    from gateway.students import StudentRegistry

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = StudentPool(StudentRegistry(Path(tmp) / "students"))
        async with PromptStore(url) as store:
            sampling = Sampling(max_tokens=16, temperature=0.0)
            cases = {"sampled": (1.0, 10**9), "not_sampled": (0.2, 10**9), "dropped": (1.0, 0)}
            metrics = Metrics(CollectorRegistry())
            for case, (share, max_inflight) in cases.items():
                settings = ShadowSettings(
                    teachers={TEACHER: ShadowTarget(student=STUDENT, share=share)},
                    max_inflight=max_inflight,
                )
                runner = ShadowRunner(settings, pool, store, metrics=metrics)
                times = []
                for _ in range(batches):
                    records = [_record(time.time(), "engine") for _ in range(batch)]
                    t0 = time.perf_counter()
                    for rec in records:
                        runner.submit(
                            rec,
                            sampling,
                            shadowable=plain_sampling(sampling) and "tools" not in rec.params,
                        )
                    times.append((time.perf_counter() - t0) / batch)
                    for task in list(runner._tasks):  # never let them run
                        task.cancel()
                    await asyncio.sleep(0)
                out[case] = statistics.median(times)
    return out


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        urls = argv or [f"sqlite+aiosqlite:///{tmp}/bench.db"]
        for url in urls:
            out = asyncio.run(evaluate_cost(url))
            print(
                f"{url.split(':', 1)[0]}: one evaluation over {out['pairs']} pairs, "
                f"{out['teacher_answers']} teacher and {out['student_answers']} student "
                f"answers: {out['evaluate_s'] * 1000:.1f} ms (median of 7; decision: "
                f"{out['decision']}); split lookup per request: "
                f"{out['split_lookup_s'] * 1e9:.0f} ns"
            )
            sub = asyncio.run(submit_cost(url))
            print(
                "shadow submit per request (the request path's share): "
                + ", ".join(f"{k} {v * 1e6:.2f} µs" for k, v in sub.items())
            )


if __name__ == "__main__":
    main(sys.argv[1:])
