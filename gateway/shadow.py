"""Shadow evaluation: a share of a teacher's live requests is also answered, in the
background, by a candidate student, and the two answers are compared and stored.

The user always gets the teacher's answer. The shadow copy starts only after the user's
response has been sent and accounted for (from the request's accounting, once the prompt-log
record exists), never counts against the user's limits, and is dropped (and counted) when
the student already has ``max_inflight`` shadow requests. Requests a student cannot honour
(logit bias, logprobs, penalties) and requests with tools are not shadowed.

Each pair is a row of the ``shadow`` table beside the prompt log (same request id), with both
answers, latencies and costs, the measure, its score and the verdict. Metrics:
``retort_shadow_requests_total{teacher,student,outcome}`` (agree, disagree, dropped, error),
``retort_shadow_agreement_ratio{teacher,student}`` over the last ``window`` pairs and
``retort_shadow_student_latency_seconds{teacher,student}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gateway.engines.base import GenerateRequest
from retort.text import answer_measure, compare, normalize_answer, rouge_l

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.engines.base import Sampling
    from gateway.metrics import Metrics
    from gateway.pricing import Pricer
    from gateway.studentpool import StudentPool
    from retort.db.record import LogRecord
    from retort.db.store import PromptStore

__all__ = [
    "MEASURES",
    "ShadowPair",
    "ShadowRunner",
    "ShadowSettings",
    "ShadowTarget",
    "choose_measure",
    "compare",
    "normalize",
    "rouge_l",
]

log = logging.getLogger("retort.shadow")

Measure = Literal["auto", "exact", "rouge_l", "json", "tool_calls"]
MEASURES: tuple[str, ...] = ("exact", "rouge_l", "json", "tool_calls")


class ShadowTarget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    student: str
    """The candidate student (a registered student's name)."""
    share: float = 0.1
    """Share of the teacher's requests also sent to the student, 0..1 (deterministic by
    request id, so replicas agree)."""
    measure: Measure = "auto"
    """How answers are compared: ``exact`` (normalized text), ``rouge_l`` (at least
    ``min_rouge_l``), ``json`` (equal JSON values), ``tool_calls`` (same names and
    arguments), or ``auto``: json for JSON answers, exact for short label-like answers (up to
    ``short_words`` words), rouge_l for open text."""
    min_rouge_l: float = 0.7
    short_words: int = 8


class ShadowSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    teachers: dict[str, ShadowTarget] = msgspec.field(default_factory=dict)
    """Teacher (the base model's name or an adapter) -> its shadow student."""
    max_inflight: int = 4
    """Shadow requests a student runs at once; past it a pair is dropped and counted."""
    window: int = 200
    """Pairs in the sliding window of ``retort_shadow_agreement_ratio``."""


# ---------------------------------------------------------------- measures (pure)


def normalize(text: str) -> str:
    """The offline eval's normalization (:func:`retort.text.normalize_answer`)."""
    return normalize_answer(text)


def choose_measure(target: ShadowTarget, teacher_text: str) -> str:
    """The measure for one pair (``auto`` decided from the teacher's answer by
    :func:`retort.text.answer_measure`, the rule the distillation gate uses too)."""
    if target.measure != "auto":
        return target.measure
    return answer_measure(teacher_text, target.short_words)


# ---------------------------------------------------------------- running pairs


@dataclass(slots=True)
class ShadowPair:
    """One stored comparison (a row of the ``shadow`` table)."""

    request_id: str
    created: float
    teacher: str
    student: str
    measure: str
    score: float | None
    agree: bool | None
    outcome: str
    teacher_text: str
    student_text: str
    teacher_latency_s: float
    student_latency_s: float | None
    teacher_cost_usd: float
    student_cost_usd: float | None
    student_tokens: int
    error: str | None = None

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _sampled(request_id: str, share: float) -> bool:
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return h / 2**64 < share


class ShadowRunner:
    """Starts shadow requests in the background and records their outcome."""

    def __init__(
        self,
        settings: ShadowSettings,
        students: StudentPool,
        store: PromptStore,
        *,
        metrics: Metrics | None = None,
        pricer: Pricer | None = None,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        for teacher, target in settings.teachers.items():
            if not 0.0 <= target.share <= 1.0:
                raise ValueError(f"shadow.teachers[{teacher!r}].share must be within [0, 1]")
        self.settings = settings
        self.students = students
        self.store = store
        self.metrics = metrics
        self.pricer = pricer
        self.redact = redact
        self._inflight: dict[str, int] = {}
        self._windows: dict[tuple[str, str], deque[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dynamic: Callable[[str], ShadowTarget | None] | None = None
        """Targets of live rollouts (``gateway.rollout``); they take precedence over
        ``shadow.teachers`` (the policy judges the rollout's student)."""

    def target_for(self, teacher: str) -> ShadowTarget | None:
        if self.dynamic is not None and (target := self.dynamic(teacher)) is not None:
            return target
        return self.settings.teachers.get(teacher)

    def submit(self, record: LogRecord, sampling: Sampling, *, shadowable: bool) -> bool:
        """Consider one finished teacher request; returns whether a shadow was started.
        Never blocks and never raises."""
        try:
            if record.status != "ok" or record.served_by != "engine" or not shadowable:
                return False
            teacher = record.adapter or record.model
            target = self.target_for(teacher)
            if target is None or not _sampled(record.request_id, target.share):
                return False
            if self._inflight.get(target.student, 0) >= self.settings.max_inflight:
                self._count(teacher, target.student, "dropped")
                return False
            self._inflight[target.student] = self._inflight.get(target.student, 0) + 1
            task = asyncio.get_running_loop().create_task(
                self._run(teacher, target, record, sampling)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return True
        except Exception:  # a shadow must never hurt the request it copies
            log.exception("shadow submission failed")
            return False

    async def _run(
        self, teacher: str, target: ShadowTarget, record: LogRecord, sampling: Sampling
    ) -> None:
        student_text = ""
        tokens = 0
        error: str | None = None
        t0 = time.perf_counter()
        try:
            engine = self.students.get(target.student) or await self.students.load(target.student)
            prompt_tokens = 0
            req = GenerateRequest(
                request_id=f"shadow-{uuid.uuid4().hex}",
                prompt=record.prompt if record.messages is None else None,
                messages=record.messages,
                sampling=sampling,
            )
            parts: list[str] = []
            async for c in engine.generate(req):
                if c.index == 0:
                    parts.append(c.text)
                    tokens = c.completion_tokens
                prompt_tokens = c.prompt_tokens
            student_text = "".join(parts)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._inflight[target.student] = max(0, self._inflight.get(target.student, 1) - 1)
        latency = time.perf_counter() - t0
        cost = None
        if error is None and self.pricer is not None:
            cost = self.pricer.cost(target.student, None, prompt_tokens, tokens)
        measure = choose_measure(target, record.completion)
        score: float | None = None
        agree: bool | None = None
        if error is None:
            score, agree = compare(measure, record.completion, student_text, target.min_rouge_l)
            outcome = "agree" if agree else "disagree"
        else:
            outcome = "error"
        pair = ShadowPair(
            request_id=record.request_id,
            created=time.time(),
            teacher=teacher,
            student=target.student,
            measure=measure,
            score=score,
            agree=agree,
            outcome=outcome,
            teacher_text=record.completion,
            student_text=student_text,
            teacher_latency_s=record.latency_s,
            student_latency_s=latency if error is None else None,
            teacher_cost_usd=record.cost_usd,
            student_cost_usd=cost,
            student_tokens=tokens,
            error=error,
        )
        self._count(teacher, target.student, outcome)
        if agree is not None:
            window = self._windows.setdefault(
                (teacher, target.student), deque(maxlen=self.settings.window)
            )
            window.append(agree)
            if self.metrics is not None:
                self.metrics.shadow_agreement(teacher, target.student, sum(window) / len(window))
                self.metrics.shadow_latency(teacher, target.student, latency)
        if self.redact is not None:
            pair.teacher_text = self.redact(pair.teacher_text)
            pair.student_text = self.redact(pair.student_text)
        try:
            await self.store.insert_shadow([pair.row()])
        except Exception:
            log.exception("storing shadow pair %s failed", record.request_id)

    def _count(self, teacher: str, student: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.shadow_request(teacher, student, outcome)

    async def drain(self, wait_s: float = 30.0) -> None:
        """Wait for shadow requests in flight (shutdown, tests)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_s)
