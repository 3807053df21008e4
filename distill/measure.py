"""The gate's measure: chosen from the logged traffic, and scored pair by pair.

- ``exact`` when the teacher's answers are label-like: nearly all short (at most
  ``eval.short_words`` words) and drawn from a small set (distinct answers at most
  ``eval.label_max_distinct`` of them);
- ``json`` when most answers are JSON (objects, arrays, tool calls): a pair agrees when
  the student's answer parses and equals the teacher's value;
- ``open`` otherwise: a pair agrees when the teacher finds the student's answer about as
  likely as its own (:func:`likelihood_ratio` at least ``eval.min_likelihood``); ROUGE-L is
  reported beside it and gated by ``gate.min_rouge_l``.

``eval.measure`` in ``distill.yaml`` overrides the choice. The per-answer rules (what is
JSON, short, a tool call; how two answers compare) are :mod:`retort.text`'s, shared with
live shadow evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from distill.results import MeasureChoice
from retort.text import answer_measure, compare, normalize_answer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from distill.config import EvalConfig
    from distill.results import Measure

__all__ = [
    "LABEL_SHARE",
    "answer_logprob",
    "choose_measure",
    "likelihood_ratio",
    "score_pair",
]

LABEL_SHARE = 0.9
"""Share of answers that must be short for the traffic to count as label-like."""


def choose_measure(completions: Sequence[str], config: EvalConfig) -> MeasureChoice:
    """The measure that fits these logged teacher answers, and why."""
    if config.measure != "auto":
        return MeasureChoice(
            measure=config.measure, reason="set in distill.yaml (eval.measure)", chosen_by="config"
        )
    n = len(completions)
    if n == 0:
        return MeasureChoice(measure="exact", reason="no logged answers", chosen_by="auto")
    kinds = Counter(answer_measure(c, config.short_words) for c in completions)
    structured = kinds["json"] + kinds["tool_calls"]
    distinct = len({normalize_answer(c) for c in completions})
    if structured / n >= 0.5:
        return MeasureChoice(
            measure="json",
            reason=f"{structured} of {n} logged answers are JSON or tool calls: "
            "JSON validity and equality",
            chosen_by="auto",
        )
    short = kinds["exact"]
    if short / n >= LABEL_SHARE and distinct <= max(1, config.label_max_distinct * n):
        return MeasureChoice(
            measure="exact",
            reason=f"{short} of {n} logged answers have at most {config.short_words} words "
            f"and there are {distinct} distinct ones (label-like): exact match",
            chosen_by="auto",
        )
    return MeasureChoice(
        measure="open",
        reason=f"open text ({short} of {n} logged answers have at most "
        f"{config.short_words} words, {distinct} distinct, {structured} JSON): "
        "the teacher's likelihood of the student's answer, and ROUGE-L",
        chosen_by="auto",
    )


def answer_logprob(model: Any, tokenizer: Any, example: dict[str, Any], answer: str) -> float:
    """Mean log-probability per token (end marker included) of ``answer`` to ``example``'s
    prompt under ``model`` (a loaded causal LM)."""
    import torch

    from adapters.data import IGNORE_INDEX
    from distill.train import encode_example

    ids, labels = encode_example(tokenizer, {**example, "completion": answer}, 1024)
    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    targets = torch.tensor(labels[1:], device=model.device)
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        return -math.inf
    logp = torch.log_softmax(logits[mask], dim=-1).gather(1, targets[mask][:, None])
    return float(logp.mean())


def likelihood_ratio(student_logprob: float, teacher_logprob: float) -> float:
    """How likely, per token, the teacher finds the student's answer relative to its own
    (geometric mean of token probabilities), capped at 1."""
    if student_logprob == -math.inf:
        return 0.0
    return math.exp(min(0.0, student_logprob - teacher_logprob))


def score_pair(
    measure: Measure, teacher: str, student: str, likelihood: float | None, min_likelihood: float
) -> tuple[float, bool]:
    """``(score, agree)`` of one pair under ``measure`` (``open`` needs ``likelihood``)."""
    if measure == "exact":
        return compare("exact", teacher, student)
    if measure == "json":
        kind = "tool_calls" if answer_measure(teacher) == "tool_calls" else "json"
        return compare(kind, teacher, student)
    if likelihood is None:
        raise ValueError("the open measure needs the teacher's likelihood of the answer")
    return likelihood, likelihood >= min_likelihood
