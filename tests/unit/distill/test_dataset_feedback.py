"""Feedback shapes the dataset: corrections become targets (also through a relabel),
answers rated below ``drop_below`` are dropped, and shadow disagreements on rated
requests are listed in the stage's result and the report."""

from __future__ import annotations

from pathlib import Path

import msgspec

from distill.config import DatasetConfig
from distill.dataset import build_dataset, load_splits, select_rows
from distill.report import write_report
from distill.results import Report, ShadowDisagreement
from distill.teacher import relabelled_target
from retort.db.store import PromptStore
from tests.unit.distill.conftest import record


async def _populate(store: PromptStore) -> None:
    await store.insert_many(
        [record(i, f"Question number {i} about topic {i * 7}?", f"Answer {i}.") for i in range(20)]
    )
    await store.add_feedback("req-1", 0.2, "wrong", "The right answer 1.")
    await store.add_feedback("req-1", 0.4, "still wrong", "The right answer, take two.")
    await store.add_feedback("req-2", 0.1)  # rated low, no correction
    await store.add_feedback("req-3", 0.9, correction="   ")  # blank corrections are not targets
    await store.insert_shadow(
        [
            {
                "request_id": f"req-{i}",
                "created": 1.0,
                "teacher": "bot",
                "student": "bot-student",
                "measure": "exact",
                "score": 0.0 if i == 3 else 1.0,
                "agree": i != 3,
                "outcome": "disagree" if i == 3 else "agree",
                "teacher_text": "t",
                "student_text": "s",
                "teacher_latency_s": 0.1,
                "student_latency_s": 0.05,
                "teacher_cost_usd": 0.0,
                "student_cost_usd": 0.0,
                "student_tokens": 1,
                "error": None,
            }
            for i in (3, 4, 5)
        ]
    )


async def test_corrections_drop_below_and_shadow_disagreements(
    store: PromptStore, tmp_path: Path
) -> None:
    await _populate(store)
    cfg = DatasetConfig(drop_below=0.3, eval_fraction=0.3, min_examples=1)
    rows = await select_rows(store, cfg, "bot")
    result = build_dataset(rows, tmp_path, cfg)
    # req-2 (0.1) is dropped; req-1's mean is 0.3, not below: kept with its latest correction.
    assert result.train + result.eval == 19
    fb = result.feedback
    assert (fb.dropped_below_score, fb.corrected) == (1, 1)
    assert fb.shadow_disagreements == [
        ShadowDisagreement(
            request_id="req-3",
            feedback_score=0.9,
            student="bot-student",
            measure="exact",
            shadow_score=0.0,
        )
    ]
    train, evals = load_splits(tmp_path / "dataset")
    by_id = {e["request_id"]: e for e in train + evals}
    assert "req-2" not in by_id
    assert (by_id["req-1"]["completion"], by_id["req-1"]["corrected"]) == (
        "The right answer, take two.",
        True,
    )
    assert (by_id["req-3"]["completion"], by_id["req-3"]["corrected"]) == ("Answer 3.", False)
    # A relabel keeps a corrected target and replaces the others.
    assert relabelled_target(by_id["req-1"], "teacher says") == "The right answer, take two."
    assert relabelled_target(by_id["req-3"], "teacher says") == "teacher says"
    # The run report lists the disagreements.
    assert result.teacher_usd_per_1k_tokens is None  # the seeded log has no costs
    result = msgspec.structs.replace(result, teacher_usd_per_1k_tokens=0.02)
    report = Report(student_model="bot-student", dataset=result, speedup=4.0)
    write_report(tmp_path / "report", report)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| teacher (measured: the prompt log's costs) | 0.02 |" in md
    assert "| student (projected from the measured speedup) | 0.005 |" in md
    assert "| projected saving at the current split (shadow: 0) / at full | 0% / 75.0% |" in md
    assert "## Shadow disagreements on rated requests" in md
    assert "| req-3 | 0.9 | bot-student | exact | 0 |" in md


async def test_a_new_correction_reruns_the_dataset_stage(
    store: PromptStore, tmp_path: Path
) -> None:
    await _populate(store)
    cfg = DatasetConfig(eval_fraction=0.3, min_examples=1, use_corrections=False)
    rows = await select_rows(store, cfg, "bot")
    first = build_dataset(rows, tmp_path, cfg)
    assert first.feedback.corrected == 0
    cfg = DatasetConfig(eval_fraction=0.3, min_examples=1)
    again = build_dataset(await select_rows(store, cfg, "bot"), tmp_path, cfg)
    assert again.feedback.corrected == 1
