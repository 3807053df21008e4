"""Stage 1, dataset: logged requests -> deduplicated train/eval HF datasets.

Selection reuses the prompt log's filter (:class:`~retort.db.filters.RowFilter`: model, adapter,
time window, minimum feedback score, status, served_by). Then:

1. exact duplicates (same normalized prompt) are dropped, the oldest kept;
2. near duplicates (Jaccard similarity of word shingles at or above a threshold, found
   with MinHash + LSH banding and confirmed exactly) are dropped the same way;
3. each prompt goes to eval when its hash falls below ``eval_fraction``, else to train,
   so a prompt can never be in both splits, whatever the order or the run.

Feedback shapes the data (:func:`mark_feedback`): a request rated below ``drop_below`` is
dropped, a reviewer's correction replaces the logged answer as the target (``corrected``),
and the shadow pairs where a candidate student disagreed on a rated request are listed in
the stage's result (the run report's ``dataset.feedback``).

Columns: ``request_id``, ``created``, ``model``, ``adapter``, ``messages`` (the prompt's
``{role, content}`` turns, empty for completions), ``prompt`` (the raw completion prompt,
empty for chat), ``completion`` (the logged answer, or its correction), ``corrected``,
``prompt_hash``.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import DatasetConfig
from distill.results import DatasetResult, FeedbackInfo, ShadowDisagreement, Watermark
from distill.stages import stage_done, write_stage

if TYPE_CHECKING:
    from collections.abc import Sequence

    from retort.db.filters import RowFilter
    from retort.db.store import PromptStore

__all__ = [
    "DatasetError",
    "Example",
    "build_dataset",
    "dedupe",
    "filters",
    "is_eval",
    "load_splits",
    "mark_feedback",
    "normalize",
    "prompt_text",
    "select_rows",
    "watermark",
]

Example = dict[str, Any]
_WS = re.compile(r"\s+")
_NUM_PERM = 64
_BANDS = 16
_PRIME = (1 << 61) - 1


class DatasetError(ValueError):
    """Too little usable data."""


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, trimmed."""
    return _WS.sub(" ", text.lower()).strip()


def prompt_text(example: Example) -> str:
    """The prompt as one string (chat turns as ``role: content`` lines)."""
    if example.get("messages"):
        return "\n".join(f"{m['role']}: {m['content']}" for m in example["messages"])
    return str(example.get("prompt") or "")


def prompt_hash(example: Example) -> str:
    return hashlib.sha256(normalize(prompt_text(example)).encode()).hexdigest()


def is_eval(phash: str, eval_fraction: float) -> bool:
    """Whether the prompt with this hash belongs to the eval split."""
    return int(phash[:8], 16) / 0x1_0000_0000 < eval_fraction


def _shingles(text: str, k: int) -> set[str]:
    words = normalize(text).split()
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}


def _minhash(shingles: set[str]) -> list[int]:
    import numpy as np

    hashes = np.array(
        [
            int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 4
            for s in shingles
        ],
        dtype=np.uint64,
    )
    rng = np.random.default_rng(1)
    a = rng.integers(1, 1 << 30, size=_NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, 1 << 30, size=_NUM_PERM, dtype=np.uint64)
    # (a*x + b) mod 2^64, x reduced to 30 bits to keep products exact in uint64.
    x = hashes & np.uint64((1 << 30) - 1)
    sig = ((a[:, None] * x[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)
    return [int(v) for v in sig]


def dedupe(
    examples: Sequence[Example], *, threshold: float = 0.9, shingle_size: int = 3
) -> tuple[list[Example], int, int]:
    """``(kept, exact_dups, near_dups)``: the first of each group of duplicates is kept."""
    seen: set[str] = set()
    unique: list[Example] = []
    for ex in examples:
        text = normalize(prompt_text(ex))
        if text in seen:
            continue
        seen.add(text)
        unique.append(ex)
    exact = len(examples) - len(unique)
    if threshold > 1.0 or len(unique) < 2:
        return unique, exact, 0
    rows = _NUM_PERM // _BANDS
    shingles = [_shingles(prompt_text(ex), shingle_size) for ex in unique]
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    kept: list[Example] = []
    for i, sh in enumerate(shingles):
        sig = _minhash(sh)
        candidates: set[int] = set()
        keys = [(b, tuple(sig[b * rows : (b + 1) * rows])) for b in range(_BANDS)]
        for key in keys:
            candidates.update(buckets.get(key, ()))
        dup = any(
            len(sh & shingles[j]) / max(1, len(sh | shingles[j])) >= threshold for j in candidates
        )
        if dup:
            continue
        for key in keys:
            buckets.setdefault(key, []).append(i)
        kept.append(unique[i])
    return kept, exact, len(unique) - len(kept)


def filters(config: DatasetConfig, adapter: str | None, *, now: float | None = None) -> RowFilter:
    """The store filter this config selects with."""
    from retort.db.export import parse_time
    from retort.db.filters import RowFilter

    return RowFilter(
        model=config.model,
        adapter=adapter,
        since=parse_time(config.since, now=now) if config.since else None,
        until=parse_time(config.until, now=now) if config.until else None,
        min_score=config.min_score,
        status=config.status,
        served_by=config.served_by,
    )


def _example(row: dict[str, Any]) -> Example | None:
    from retort.db.export import export_row

    out = export_row(row)
    messages = list(out.get("messages") or [])
    # A chat prompt ends with a user (or tool) turn; a trailing assistant turn would be a
    # prefill, which the student cannot learn from the completion alone: skip those.
    if messages and messages[-1]["role"] == "assistant":
        return None
    prompt = out.get("prompt") or ""
    if not messages and not prompt:
        return None
    completion = row.get("correction") or out.get("completion") or ""
    if not completion.strip():
        return None
    return {
        "request_id": out["request_id"],
        "created": float(out["created"]),
        "model": out["model"],
        "adapter": out.get("adapter"),
        "messages": messages,
        "prompt": prompt,
        "completion": completion,
        "corrected": bool(row.get("correction")),
    }


async def select_rows(
    store: PromptStore, config: DatasetConfig, adapter: str | None, *, now: float | None = None
) -> list[dict[str, Any]]:
    """Matching log rows, oldest first, marked by their feedback (:func:`mark_feedback`)."""
    rows = await store.query(filters(config, adapter, now=now), limit=config.limit)
    await mark_feedback(store, rows, config)
    return rows


async def mark_feedback(
    store: PromptStore, rows: list[dict[str, Any]], config: DatasetConfig
) -> None:
    """On each rated row: ``low_score`` (rated below ``drop_below``), ``correction`` (the
    latest reviewer's correction) and ``shadow_disagreements`` (shadow pairs where a
    student disagreed with this answer)."""
    for row in rows:
        if not row.get("feedback_count"):
            continue
        score = row.get("score")
        if config.drop_below is not None and score is not None and score < config.drop_below:
            row["low_score"] = True
        if config.use_corrections:
            notes = await store.feedback_for(row["request_id"])
            fixed = [f["correction"] for f in notes if f["correction"] and f["correction"].strip()]
            if fixed:
                row["correction"] = fixed[-1]
        pairs = await store.shadow_pairs(request_id=row["request_id"], limit=10)
        row["shadow_disagreements"] = [
            {
                "request_id": row["request_id"],
                "feedback_score": score,
                "student": p["student"],
                "measure": p["measure"],
                "shadow_score": p["score"],
            }
            for p in pairs
            if p["agree"] is False
        ]


def _usd_per_1k(rows: Sequence[dict[str, Any]]) -> float | None:
    """The teacher's measured cost per 1k tokens over the selected requests (the log's costs)."""
    tokens = sum(
        int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) for r in rows
    )
    cost = sum(float(r.get("cost_usd") or 0.0) for r in rows)
    return cost / tokens * 1000.0 if tokens and cost else None


def _feedback_marks(rows: Sequence[dict[str, Any]]) -> str:
    """A fingerprint of what feedback changed (a new correction or rating re-runs the stage)."""
    marks = [
        f"{r['request_id']}\0{bool(r.get('low_score'))}\0{r.get('correction') or ''}"
        for r in rows
        if r.get("low_score") or r.get("correction")
    ]
    return hashlib.sha256("\n".join(marks).encode()).hexdigest()


def watermark(rows: Sequence[dict[str, Any]]) -> Watermark:
    """What a run saw of the log: the latest ``created`` and how many rows matched."""
    return Watermark(
        created=max((float(r["created"]) for r in rows), default=None), count=len(rows)
    )


def build_dataset(
    rows: Sequence[dict[str, Any]], run_dir: Path, config: DatasetConfig
) -> DatasetResult:
    """Dedupe, split and save ``run_dir/dataset/{train,eval}``; returns the stage result."""
    stage = run_dir / "dataset"
    inputs = {
        "config": config,
        "watermark": watermark(rows),
        "ids": hashlib.sha256("\n".join(r["request_id"] for r in rows).encode()).hexdigest(),
        "feedback": _feedback_marks(rows),
    }
    done = stage_done(stage, inputs, DatasetResult)
    if done is not None:
        return done
    from datasets import Dataset, Features, List, Value

    t0 = time.perf_counter()
    low = sum(1 for r in rows if r.get("low_score"))
    examples = [e for e in (_example(r) for r in rows if not r.get("low_score")) if e is not None]
    kept, exact, near = dedupe(
        examples, threshold=config.near_dup_threshold, shingle_size=config.shingle_size
    )
    if len(kept) < config.min_examples:
        raise DatasetError(
            f"only {len(kept)} usable examples after dedupe (need {config.min_examples}); "
            f"{len(rows)} rows matched the filters"
        )
    train: list[Example] = []
    evals: list[Example] = []
    for ex in kept:
        ex["prompt_hash"] = prompt_hash(ex)
        (evals if is_eval(ex["prompt_hash"], config.eval_fraction) else train).append(ex)
    if config.max_eval is not None:
        evals = evals[: config.max_eval]
    features = Features(
        {
            "request_id": Value("string"),
            "created": Value("float64"),
            "model": Value("string"),
            "adapter": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "prompt": Value("string"),
            "completion": Value("string"),
            "corrected": Value("bool"),
            "prompt_hash": Value("string"),
        }
    )
    for name, split in (("train", train), ("eval", evals)):
        out = stage / name
        tmp = stage / f".{name}.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(split, features=features).save_to_disk(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    models: dict[str, int] = {}
    for ex in kept:
        models[ex["model"]] = models.get(ex["model"], 0) + 1
    result = DatasetResult(
        selected=len(rows),
        usable=len(examples),
        exact_duplicates=exact,
        near_duplicates=near,
        train=len(train),
        eval=len(evals),
        models=models,
        teacher_usd_per_1k_tokens=_usd_per_1k(rows),
        feedback=FeedbackInfo(
            dropped_below_score=low,
            corrected=sum(1 for ex in kept if ex["corrected"]),
            shadow_disagreements=[
                ShadowDisagreement(**d) for r in rows for d in r.get("shadow_disagreements", [])
            ][:50],
        ),
        watermark=watermark(rows),
        seconds=round(time.perf_counter() - t0, 3),
    )
    write_stage(stage, inputs, result)
    return result


def load_splits(folder: Path) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` from a dataset folder (``run/dataset`` or relabelled ``run/labels``)."""
    from datasets import load_from_disk

    train = load_from_disk(str(folder / "train")).to_list()
    evals = load_from_disk(str(folder / "eval")).to_list()
    return train, evals
