"""Comparing answers, one home for the offline eval gate (``distill``) and live shadow
evaluation (``gateway.shadow``), so their figures agree: one normalization, one ROUGE-L, one
reading of JSON and tool calls, and one per-answer rule for which measure fits."""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = [
    "NOT_JSON",
    "answer_measure",
    "compare",
    "normalize_answer",
    "parse_json",
    "rouge_l",
    "tool_calls",
]

_PUNCT = re.compile(r"[^\w\s]")
_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over normalized words (longest common subsequence)."""
    a, b = normalize_answer(candidate).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


NOT_JSON: Any = object()
"""What :func:`parse_json` returns for text that is not JSON."""


def parse_json(text: str) -> Any:
    """The JSON value of ``text`` (surrounding whitespace allowed), else :data:`NOT_JSON`."""
    try:
        return msgspec.json.decode(text.strip())
    except msgspec.DecodeError:
        return NOT_JSON


def tool_calls(text: str) -> list[tuple[str, Any]] | None:
    """Tool calls in an answer: a JSON list of ``{name, arguments|parameters}`` (forced
    calls) or Hermes ``<tool_call>`` blocks; ``None`` when there are none."""
    value = parse_json(text)
    objs = value if isinstance(value, list) else _hermes_calls(text)
    if not objs:
        return None
    out = []
    for o in objs:
        if not isinstance(o, dict) or "name" not in o:
            return None
        out.append((str(o["name"]), o.get("arguments", o.get("parameters"))))
    return out


def _hermes_calls(text: str) -> list[Any]:
    return [parse_json(part.split("</tool_call>")[0]) for part in text.split("<tool_call>")[1:]]


def answer_measure(teacher_text: str, short_words: int = 8) -> str:
    """The measure that fits one teacher answer: ``tool_calls``, ``json`` (a JSON object or
    array), ``exact`` (label-like: at most ``short_words`` words) or ``rouge_l`` (open text)."""
    if tool_calls(teacher_text) is not None:
        return "tool_calls"
    value = parse_json(teacher_text)
    if value is not NOT_JSON and isinstance(value, dict | list):
        return "json"
    if len(teacher_text.split()) <= short_words:
        return "exact"
    return "rouge_l"


def compare(
    measure: str, teacher: str, student: str, min_rouge_l: float = 0.7
) -> tuple[float, bool]:
    """``(score, agree)`` of a student's answer against its teacher's."""
    if measure == "exact":
        same = normalize_answer(teacher) == normalize_answer(student)
        return (1.0 if same else 0.0), same
    if measure == "json":
        a, b = parse_json(teacher), parse_json(student)
        same = a is not NOT_JSON and a == b
        return (1.0 if same else 0.0), same
    if measure == "tool_calls":
        a_calls, b_calls = tool_calls(teacher), tool_calls(student)
        same = a_calls is not None and a_calls == b_calls
        return (1.0 if same else 0.0), same
    if measure == "rouge_l":
        score = rouge_l(student, teacher)
        return score, score >= min_rouge_l
    raise ValueError(f"unknown measure {measure!r}")
