"""``loadtest.rollout_bench --distilled``: what it takes from a distill.bench run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from distill.bench import _questions
from loadtest.rollout_bench import _distilled


def _run(tmp_path: Path, published: bool) -> Path:
    work = tmp_path / "work"
    for part in ("adapters/sentiment", "students/sentiment-student"):
        (work / "home" / part).mkdir(parents=True)
        (work / "home" / part / "marker").write_text(part)
    bench = {"task": "sentiment", "published": published, "student_model": "sentiment-student"}
    bench["populate"] = {"records": 300}
    (work / "bench.json").write_text(json.dumps(bench))
    return work


def test_fresh_prompts_of_the_task_outside_the_log(tmp_path: Path) -> None:
    home = tmp_path / "home"
    bench, prompts = _distilled(_run(tmp_path, True), home, 40)
    assert bench["student_model"] == "sentiment-student"
    assert (home / "adapters/sentiment/marker").exists()
    assert (home / "students/sentiment-student/marker").exists()
    assert len(prompts) == len(set(prompts)) == 40
    logged = {q for q, _ in _questions("sentiment", random.Random(1), 300)}
    assert not logged & set(prompts)
    assert all(p.startswith("Review: ") for p in prompts)


def test_a_run_that_published_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="published no student"):
        _distilled(_run(tmp_path, False), tmp_path / "home", 8)
