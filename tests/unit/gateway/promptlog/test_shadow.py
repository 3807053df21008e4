"""Shadow evaluation: the comparison measures (pure) and the runner against a real store
(SQLite and Postgres) with the deterministic fake engine as the student."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.engines.base import Sampling
from gateway.engines.fake import FakeEngine
from gateway.metrics import Metrics
from gateway.pricing import Pricer
from gateway.shadow import (
    ShadowRunner,
    ShadowSettings,
    ShadowTarget,
    choose_measure,
    compare,
    normalize,
    rouge_l,
)
from tests.unit.gateway.promptlog.conftest import make_record

if TYPE_CHECKING:
    from gateway.promptlog.store import PromptStore


FAKE_ANSWER = "The quick brown fox"  # the fake engine's first 4 tokens


# ---------------------------------------------------------------- measures


def test_normalize_and_exact() -> None:
    assert normalize("  Positive. ") == "positive"
    assert compare("exact", "Positive.", "positive") == (1.0, True)
    assert compare("exact", "Positive", "Negative") == (0.0, False)


def test_rouge_l_known_values() -> None:
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    # LCS "a c d" = 3 of 4 both ways.
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    score, agree = compare("rouge_l", "a b c d", "a c d e", min_rouge_l=0.7)
    assert agree
    assert score == pytest.approx(0.75)
    assert not compare("rouge_l", "a b c d", "a c d e", min_rouge_l=0.8)[1]


def test_json_equality_ignores_formatting() -> None:
    assert compare("json", '{"a": 1, "b": [2]}', '{"b":[2],"a":1}')[1]
    assert not compare("json", '{"a": 1}', '{"a": 2}')[1]
    assert not compare("json", "not json", "not json")[1]


def test_tool_calls_compare_names_and_arguments() -> None:
    teacher = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}}])
    same = '[{"name":"get_weather","parameters":{"city":"Paris"}}]'
    other = json.dumps([{"name": "get_weather", "parameters": {"city": "Rome"}}])
    assert compare("tool_calls", teacher, same)[1]
    assert not compare("tool_calls", teacher, other)[1]
    hermes = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert compare("tool_calls", hermes, hermes)[1]
    assert not compare("tool_calls", hermes, "It is sunny.")[1]


def test_auto_measure_follows_the_answer() -> None:
    auto = ShadowTarget(student="s")
    assert choose_measure(auto, "Positive") == "exact"
    assert choose_measure(auto, '{"label": "positive"}') == "json"
    assert choose_measure(auto, '[{"name": "f", "parameters": {}}]') == "tool_calls"
    long = "one two three four five six seven eight nine ten"
    assert choose_measure(auto, long) == "rouge_l"
    assert choose_measure(ShadowTarget(student="s", measure="exact"), long) == "exact"


# ---------------------------------------------------------------- the runner


class _Pool:
    """The two StudentPool methods the runner uses, over one real engine."""

    def __init__(self, engine: FakeEngine | None) -> None:
        self.engine = engine

    def get(self, name: str) -> Any:
        return self.engine

    async def load(self, name: str) -> Any:
        raise KeyError(name)


def _runner(
    store: PromptStore, *, share: float = 1.0, max_inflight: int = 4, delay: float = 0.0
) -> tuple[ShadowRunner, Metrics, FakeEngine]:
    metrics = Metrics(CollectorRegistry())
    engine = FakeEngine(model_name="stu", token_delay_s=delay)
    settings = ShadowSettings(
        teachers={"pirate": ShadowTarget(student="stu", share=share, measure="exact")},
        max_inflight=max_inflight,
    )
    runner = ShadowRunner(
        settings,
        _Pool(engine),  # type: ignore[arg-type]
        store,
        metrics=metrics,
        pricer=Pricer(),
        redact=lambda t: t.replace("secret", "[REDACTED]"),
    )
    return runner, metrics, engine


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return float(v or 0.0)


@pytest.mark.asyncio(loop_scope="session")
async def test_agreeing_pair_is_stored_with_metrics(store: PromptStore) -> None:
    runner, metrics, _ = _runner(store)
    rec = make_record(1, adapter="pirate", completion=FAKE_ANSWER, latency_s=0.5, cost_usd=2e-6)
    assert runner.submit(rec, Sampling(max_tokens=4), shadowable=True)
    await runner.drain()
    pairs = await store.shadow_pairs(teacher="pirate")
    assert len(pairs) == 1
    p = pairs[0]
    assert p["request_id"] == "req-1"
    assert p["student"] == "stu"
    assert p["agree"] is True
    assert p["outcome"] == "agree"
    assert p["student_text"] == FAKE_ANSWER
    assert p["teacher_latency_s"] == 0.5
    assert p["student_latency_s"] is not None
    assert p["teacher_cost_usd"] == 2e-6
    assert p["student_tokens"] == 4
    labels = {"teacher": "pirate", "student": "stu"}
    assert _value(metrics, "retort_shadow_requests_total", **labels, outcome="agree") == 1
    assert _value(metrics, "retort_shadow_agreement_ratio", **labels) == 1.0
    assert _value(metrics, "retort_shadow_student_latency_seconds_count", **labels) == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_disagreement_and_redaction(store: PromptStore) -> None:
    runner, metrics, _ = _runner(store)
    rec = make_record(2, adapter="pirate", completion="my secret answer")
    runner.submit(rec, Sampling(max_tokens=4), shadowable=True)
    runner.submit(
        make_record(3, adapter="pirate", completion=FAKE_ANSWER),
        Sampling(max_tokens=4),
        shadowable=True,
    )
    await runner.drain()
    pairs = {p["request_id"]: p for p in await store.shadow_pairs()}
    assert pairs["req-2"]["agree"] is False
    assert pairs["req-2"]["teacher_text"] == "my [REDACTED] answer"
    labels = {"teacher": "pirate", "student": "stu"}
    assert _value(metrics, "retort_shadow_requests_total", **labels, outcome="disagree") == 1
    assert _value(metrics, "retort_shadow_agreement_ratio", **labels) == 0.5


@pytest.mark.asyncio(loop_scope="session")
async def test_only_shadowable_teacher_traffic_is_copied(store: PromptStore) -> None:
    runner, _, _ = _runner(store)
    s = Sampling(max_tokens=2)
    assert not runner.submit(make_record(4, adapter="other"), s, shadowable=True)
    assert not runner.submit(make_record(5, adapter="pirate", status="error"), s, shadowable=True)
    assert not runner.submit(
        make_record(6, adapter="pirate", served_by="student"), s, shadowable=True
    )
    assert not runner.submit(make_record(7, adapter="pirate"), s, shadowable=False)
    none, _, _ = _runner(store, share=0.0)
    assert not none.submit(make_record(8, adapter="pirate"), s, shadowable=True)
    await runner.drain()
    assert await store.shadow_pairs() == []


@pytest.mark.asyncio(loop_scope="session")
async def test_share_is_deterministic_by_request_id(store: PromptStore) -> None:
    runner, _, _ = _runner(store, share=0.3, max_inflight=1000)
    s = Sampling(max_tokens=1)
    picked = [
        runner.submit(make_record(i, adapter="pirate"), s, shadowable=True) for i in range(400)
    ]
    await runner.drain()
    again, _, _ = _runner(store, share=0.3, max_inflight=1000)
    picked2 = [
        again.submit(make_record(i, adapter="pirate"), s, shadowable=True) for i in range(400)
    ]
    await again.drain()
    assert picked == picked2
    assert 0.2 < sum(picked) / 400 < 0.4


@pytest.mark.asyncio(loop_scope="session")
async def test_saturated_student_drops_and_counts(store: PromptStore) -> None:
    runner, metrics, _ = _runner(store, max_inflight=2, delay=0.05)
    s = Sampling(max_tokens=3)
    started = [
        runner.submit(make_record(10 + i, adapter="pirate"), s, shadowable=True) for i in range(5)
    ]
    assert started == [True, True, False, False, False]
    labels = {"teacher": "pirate", "student": "stu", "outcome": "dropped"}
    assert _value(metrics, "retort_shadow_requests_total", **labels) == 3
    await runner.drain()
    # Slots come back once the shadows finish.
    assert runner.submit(make_record(20, adapter="pirate"), s, shadowable=True)
    await runner.drain()


@pytest.mark.asyncio(loop_scope="session")
async def test_student_failure_is_an_error_outcome(store: PromptStore) -> None:
    runner, metrics, engine = _runner(store)
    engine.kill()
    runner.submit(make_record(30, adapter="pirate"), Sampling(max_tokens=2), shadowable=True)
    await runner.drain()
    (pair,) = await store.shadow_pairs(request_id="req-30")
    assert pair["outcome"] == "error"
    assert pair["agree"] is None
    assert "dead" in pair["error"]
    labels = {"teacher": "pirate", "student": "stu", "outcome": "error"}
    assert _value(metrics, "retort_shadow_requests_total", **labels) == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_submit_never_waits_for_the_student(store: PromptStore) -> None:
    runner, _, _ = _runner(store, delay=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    runner.submit(make_record(40, adapter="pirate"), Sampling(max_tokens=5), shadowable=True)
    assert loop.time() - t0 < 0.05
    await runner.drain()
    assert len(await store.shadow_pairs(request_id="req-40")) == 1


def test_share_out_of_range_is_refused() -> None:
    bad = ShadowSettings(teachers={"t": ShadowTarget(student="s", share=1.5)})
    with pytest.raises(ValueError, match="share"):
        ShadowRunner(bad, _Pool(None), None)  # type: ignore[arg-type]
