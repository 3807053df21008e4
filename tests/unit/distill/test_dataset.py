from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import DatasetConfig
from distill.dataset import (
    DatasetError,
    build_dataset,
    dedupe,
    load_splits,
    normalize,
    select_rows,
)
from distill.results import Watermark
from retort.db.store import PromptStore
from tests.unit.distill.conftest import record


def _ex(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "prompt": ""}


def test_dedupe_exact_and_near() -> None:
    long = "please summarize the following meeting notes about the quarterly budget review today"
    examples = [
        _ex("What is 2 plus 2?"),
        _ex("what is 2   PLUS 2?"),  # exact after normalization
        _ex(long),
        _ex(long + " please"),  # near duplicate
        _ex("Tell me about the moon."),
    ]
    kept, exact, near = dedupe(examples, threshold=0.8)
    assert exact == 1
    assert near == 1
    assert [normalize(e["messages"][0]["content"]) for e in kept] == [
        "what is 2 plus 2?",
        long,
        "tell me about the moon.",
    ]
    kept_all, _, near_none = dedupe(examples, threshold=1.01)
    assert near_none == 0
    assert len(kept_all) == 4


async def _populate(store: PromptStore) -> None:
    recs = [
        record(i, f"Question number {i} about topic {i * 7}?", f"Answer {i}.") for i in range(60)
    ]
    recs += [record(100 + i, f"Question number {i} about topic {i * 7}?", "dup") for i in range(10)]
    recs.append(record(200, "Other model?", "x", model="other"))
    recs.append(record(201, "Errored?", "x", status="error"))
    recs.append(record(202, "Student?", "x", served_by="student"))
    recs.append(record(203, "Other adapter?", "x", adapter="zzz"))
    recs.append(record(204, "Empty completion?", " "))
    await store.insert_many(recs)
    await store.add_feedback("req-1", 0.0)


async def test_select_split_no_leak(store: PromptStore, tmp_path: Path) -> None:
    await _populate(store)
    cfg = DatasetConfig(model="base", eval_fraction=0.3)
    rows = await select_rows(store, cfg, "bot")
    assert len(rows) == 71  # 60 + 10 dups + empty completion
    result = build_dataset(rows, tmp_path, cfg)
    assert result.exact_duplicates == 10
    assert result.usable == 70
    assert result.train + result.eval == 60
    assert result.eval > 0
    assert result.train > 0
    assert result.watermark == Watermark(created=1_700_000_000.0 + 204, count=71)
    train, evals = load_splits(tmp_path / "dataset")
    train_prompts = {e["prompt_hash"] for e in train}
    assert not train_prompts & {e["prompt_hash"] for e in evals}
    assert all(e["completion"].startswith("Answer") for e in train + evals)  # oldest kept
    assert train[0]["messages"] == [{"role": "user", "content": train[0]["messages"][0]["content"]}]
    # Re-running with the same rows is a no-op (stage skipped).
    mtime = (tmp_path / "dataset" / "stage.json").stat().st_mtime_ns
    assert build_dataset(rows, tmp_path, cfg) == result
    assert (tmp_path / "dataset" / "stage.json").stat().st_mtime_ns == mtime


async def test_split_is_stable_across_runs(store: PromptStore, tmp_path: Path) -> None:
    await _populate(store)
    cfg = DatasetConfig(eval_fraction=0.3)
    rows = await select_rows(store, cfg, "bot")
    build_dataset(rows, tmp_path / "a", cfg)
    build_dataset(list(reversed(rows)), tmp_path / "b", cfg)
    _, eval_a = load_splits(tmp_path / "a" / "dataset")
    _, eval_b = load_splits(tmp_path / "b" / "dataset")
    assert {e["prompt_hash"] for e in eval_a} == {e["prompt_hash"] for e in eval_b}


async def test_min_score_and_too_few(store: PromptStore, tmp_path: Path) -> None:
    await _populate(store)
    cfg = DatasetConfig(min_score=0.5)
    rows = await select_rows(store, cfg, "bot")
    assert rows == []  # only req-1 has feedback, and it scored 0
    with pytest.raises(DatasetError, match="usable examples"):
        build_dataset(rows, tmp_path, cfg)
