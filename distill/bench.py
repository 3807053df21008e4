"""The distillation benchmark (outside CI): ``python -m distill.bench --work DIR``.

1. trains the ``pirate`` style adapter on the default model (``adapters.testing``'s recipe);
2. logs ``--prompts`` requests of a narrow task (``--task sentiment``: classify short
   reviews, a skill task; ``qa``: arithmetic, capitals, colours, opposites, animal sounds,
   few distinct prompts and knowledge-heavy) answered by the teacher (base + adapter)
   through vLLM offline batch generation, into a SQLite prompt log;
3. runs ``retort distill run --adapter pirate --publish`` on that log and prints the
   report, the time of each stage and the peak memory of the process tree.

Each step is skipped when its output exists in ``DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _train_adapter(home: Path, base: Path) -> Path:
    from adapters.testing import STYLE_RECIPE, make_style_dataset
    from adapters.train import TrainConfig, train

    target = home / "adapters" / "pirate"
    if (target / "adapter_config.json").is_file():
        return target
    data = make_style_dataset(home / "pirate.jsonl", n=64)
    return train(
        TrainConfig(
            data=data,
            name="pirate",
            base_model=base,
            out_root=home / "adapters",
            max_steps=STYLE_RECIPE["max_steps"],
            lr=STYLE_RECIPE["lr"],
            rank=STYLE_RECIPE["rank"],
            alpha=STYLE_RECIPE["alpha"],
        )
    )


_POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "lovely",
    "fantastic",
    "delightful",
    "superb",
    "amazing",
    "pleasant",
    "brilliant",
]
_NEGATIVE = [
    "terrible",
    "awful",
    "horrible",
    "dreadful",
    "disappointing",
    "poor",
    "bad",
    "miserable",
    "boring",
    "broken",
]
_THINGS = [
    "movie",
    "book",
    "pizza",
    "hotel",
    "phone",
    "concert",
    "coffee",
    "game",
    "car",
    "shoes",
    "restaurant",
    "laptop",
    "album",
    "show",
    "chair",
    "camera",
    "bike",
    "jacket",
    "park",
    "museum",
]
_OPENERS = [
    "The {t} was {a}.",
    "What a {a} {t}!",
    "This {t} is {a}.",
    "I found the {t} {a}.",
    "Honestly, the {t} felt {a}.",
]


def _questions(task: str, rng: random.Random, n: int) -> list[str]:
    """``qa``: adapters.testing's mixed questions (few distinct ones, knowledge-heavy);
    ``sentiment``: review classification, hundreds of distinct prompts, a skill task."""
    if task == "qa":
        from adapters.testing import _qa_pairs

        return [q for q, _ in _qa_pairs(rng, n)]
    out = []
    for _ in range(n):
        words = rng.choice([_POSITIVE, _NEGATIVE])
        review = rng.choice(_OPENERS).format(t=rng.choice(_THINGS), a=rng.choice(words))
        out.append(f"Review: {review} Is this review positive or negative? Answer in one word.")
    return out


def _populate(
    home: Path, base: Path, adapter: Path, n: int, base_name: str, task: str
) -> dict[str, Any]:
    from distill.teacher import merge_teacher, run_vllm
    from gateway.promptlog.record import LogRecord
    from gateway.promptlog.settings import default_url
    from gateway.promptlog.store import PromptStore

    url = default_url(home)
    marker = home / "populated.json"
    if marker.is_file():
        return dict(json.loads(marker.read_text()))
    merged = merge_teacher(base, adapter, home / "teacher-merged")
    questions = _questions(task, random.Random(1), n)
    t0 = time.perf_counter()
    out = run_vllm(
        {
            "model": str(merged),
            "max_tokens": 48,
            "mode": "batch",
            "prompts": [{"messages": [{"role": "user", "content": q}]} for q in questions],
        }
    )
    now = time.time()
    records = [
        LogRecord(
            request_id=f"bench-{i}",
            created=now - n + i,
            model=base_name,
            adapter="pirate",
            endpoint="chat",
            messages=[{"role": "user", "content": q}],
            completion=c,
            finish_reason="stop",
            params={"temperature": 0},
        )
        for i, (q, c) in enumerate(zip(questions, out["completions"], strict=True))
    ]

    async def insert() -> None:
        async with PromptStore(url) as store:
            await store.insert_many(records)

    asyncio.run(insert())
    info = {
        "records": n,
        "vllm_seconds": round(time.perf_counter() - t0, 1),
        "vllm_startup_seconds": out["startup_seconds"],
        "vllm_batch_seconds": out["seconds"],
        "unique_prompts": len(set(questions)),
    }
    marker.write_text(json.dumps(info))
    return info


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--config", type=Path, default=None, help="distill.yaml overrides")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--student-layers", type=int, default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--task", choices=["qa", "sentiment"], default="sentiment")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from distill.config import load_config
    from distill.pipeline import run
    from gateway.models import DEFAULT_MODEL_NAME, pull_default

    work = args.work.resolve()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    base = pull_default(Path(os.environ.get("RETORT_HOME", "~/.cache/retort")).expanduser())
    t0 = time.perf_counter()
    adapter = _train_adapter(home, base)
    t_adapter = time.perf_counter() - t0
    pop = _populate(home, base, adapter, args.prompts, DEFAULT_MODEL_NAME, args.task)
    overrides: dict[str, Any] = {
        "adapter": "pirate",
        "home": str(home),
        "publish": True,
        "teacher": {"base_model": str(base), "base_model_name": DEFAULT_MODEL_NAME},
    }
    if args.max_steps is not None:
        overrides["train"] = {"max_steps": args.max_steps}
    if args.student_layers is not None:
        overrides["student"] = {"layers": args.student_layers}
    if args.precision is not None:
        overrides["export"] = {"precision": args.precision}
    cfg = load_config(args.config, overrides)
    t1 = time.perf_counter()
    report = run(cfg, work / "run", force=True)
    pipeline_s = time.perf_counter() - t1
    keys = (
        "student_model",
        "teacher_params",
        "student_params",
        "param_ratio",
        "agreement",
        "rouge_l",
        "teacher_tokens_per_s",
        "student_tokens_per_s",
        "speedup",
        "student_size_bytes",
        "gate_passed",
        "published",
        "stages",
    )
    result = {
        "adapter_train_seconds": round(t_adapter, 1),
        "populate": pop,
        "pipeline_seconds": round(pipeline_s, 1),
        "peak_rss_mb": round(_peak_rss_mb()),
        **{k: report.get(k) for k in keys},
    }
    (work / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
