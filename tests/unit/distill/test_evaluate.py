from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import GateConfig
from distill.evaluate import gate, normalize_answer, rouge_l, write_report


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


def test_gate() -> None:
    metrics = {"agreement": 0.95, "rouge_l": 0.97, "speedup": 6.0, "param_ratio": 0.3}
    assert gate(metrics, GateConfig(min_agreement=0.9, min_speedup=5.0))["passed"]
    failed = gate(metrics, GateConfig(min_agreement=0.99, max_param_ratio=0.2))
    assert not failed["passed"]
    assert not failed["checks"]["agreement"]["passed"]
    assert not failed["checks"]["param_ratio"]["passed"]
    assert failed["checks"]["rouge_l"]["passed"]
    none = GateConfig(min_agreement=None, min_rouge_l=None, min_speedup=None, max_param_ratio=None)
    assert gate({}, none) == {"passed": True, "checks": {}}
    assert not gate({"speedup": None}, GateConfig(min_speedup=1.0))["passed"]


def test_write_report(tmp_path: Path) -> None:
    report = {
        "student_model": "s",
        "teacher_params": 100,
        "student_params": 30,
        "agreement": 0.5,
        "rouge_l": 0.7,
        "teacher_tokens_per_s": 20.0,
        "student_tokens_per_s": 150.0,
        "gate_passed": True,
        "gate": gate({"agreement": 0.5}, GateConfig()),
    }
    samples = [{"prompt": "q", "teacher": "a", "student": "b"}]
    write_report(tmp_path, report, samples)
    assert json.loads((tmp_path / "report.json").read_text())["student_model"] == "s"
    md = (tmp_path / "report.md").read_text()
    assert "| agreement | 0.5 |" in md
    assert "## Gate" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
