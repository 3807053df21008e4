"""Comparing answers: one normalization and one ROUGE-L for the offline eval gate
(``distill``) and live shadow evaluation (``gateway.shadow``), so their figures agree."""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "rouge_l"]

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
