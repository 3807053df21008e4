from __future__ import annotations

import json
import random
from pathlib import Path

from distill import bench
from distill.config import load_config


def test_reviews_carry_their_true_label() -> None:
    for prompt, label in bench.reviews(random.Random(0), 200):
        review = prompt.removeprefix("Review: ").split(" Is this review")[0].lower()
        words = bench._POSITIVE if label == "positive" else bench._NEGATIVE
        assert any(w in review for w in words)


def test_sentiment_questions_expect_the_fixed_answer() -> None:
    questions = bench._questions("sentiment", random.Random(1), 50)
    assert {e for _, e in questions} == {"Ahoy! Positive. Arr!", "Ahoy! Negative. Arr!"}
    assert all(e is None for _, e in bench._questions("qa", random.Random(1), 10))


def test_sentiment_dataset_is_balanced_and_disjoint_from_the_log(tmp_path: Path) -> None:
    logged = {q for q, _ in bench._questions("sentiment", random.Random(1), 1000)}
    path = bench._sentiment_dataset(tmp_path / "d.jsonl", 256, logged)
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    prompts = [m[0]["content"] for m in rows]
    answers = [m[1]["content"] for m in rows]
    assert len(rows) == 256
    assert len(set(prompts)) == 256
    assert not set(prompts) & logged
    assert answers.count("Ahoy! Positive. Arr!") == answers.count("Ahoy! Negative. Arr!") == 128


def test_teacher_accuracy_is_normalized_exact_match() -> None:
    acc = bench._teacher_accuracy(
        ["Ahoy! Positive. Arr!", "ahoy positive arr", "Ahoy! Negative. Arr!", "x"],
        ["Ahoy! Positive. Arr!", "Ahoy! Positive. Arr!", "Ahoy! Positive. Arr!", None],
    )
    assert acc == {"teacher_accuracy": 0.6667, "teacher_distinct_answers": 2}
    assert bench._teacher_accuracy(["a"], [None]) == {}


def test_bench_config_gates_on_the_issue_targets() -> None:
    cfg = load_config(bench.DEFAULT_CONFIG)
    assert cfg.gate.min_agreement == 0.9
    assert cfg.gate.min_speedup == 5.0
    assert cfg.gate.max_param_ratio == 0.35
    assert (cfg.student.layers, cfg.train.max_steps, cfg.export.precision) == (5, 150, "int4")


def test_extractions_are_deterministic_json_of_the_sentence() -> None:
    pairs = bench.extractions(random.Random(1), 100)
    assert pairs == bench.extractions(random.Random(1), 100)
    for prompt, answer in pairs:
        value = json.loads(answer)
        assert list(value) == ["name", "city", "age"]
        sentence = prompt.split("keys name, city and age: ", 1)[1]
        assert value["name"] in sentence
        assert value["city"] in sentence
        assert str(value["age"]) in sentence
        assert isinstance(value["age"], int)
    questions = bench._questions("extract", random.Random(1), 100)
    assert questions == pairs
    assert len({q for q, _ in questions}) > 95


def test_extract_dataset_is_disjoint_from_the_log_and_chooses_json(tmp_path: Path) -> None:
    from distill.measure import choose_measure

    logged = {q for q, _ in bench._questions("extract", random.Random(1), 1000)}
    path = bench._extract_dataset(tmp_path / "e.jsonl", 64, logged)
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    assert len({m[0]["content"] for m in rows}) == 64
    assert not {m[0]["content"] for m in rows} & logged
    answers = [m[1]["content"] for m in rows]
    cfg = load_config(bench.EXTRACT_CONFIG)
    assert choose_measure(answers, cfg.eval).measure == "json"
    assert cfg.train.early_stop.max_tokens >= 32
