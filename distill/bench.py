"""The distillation benchmark (outside CI): ``python -m distill.bench --work DIR``.

1. trains the teacher's adapter on the default model with :func:`adapters.train.train`:
   ``--task sentiment`` (the default): ``sentiment``, a classifier of short reviews that
   answers in a fixed format, ``Ahoy! Positive. Arr!`` or ``Ahoy! Negative. Arr!``
   (:data:`SENTIMENT_RECIPE`; trained on labelled reviews none of which is among the logged
   prompts); ``--task extract``: ``extract``, which answers a sentence about a person with
   ``{"name": ..., "city": ..., "age": ...}`` (:data:`EXTRACT_RECIPE`, :func:`extractions`,
   longer answers than a label); ``--task qa``: the ``pirate`` style adapter
   (``adapters.synthetic``'s recipe);
2. logs ``--prompts`` requests of that task (``sentiment``: hundreds of distinct reviews;
   ``extract``: generated sentences, deterministic; ``qa``: arithmetic, capitals, colours,
   opposites, animal sounds, few distinct prompts and knowledge-heavy) answered by the
   teacher (base + adapter) through vLLM offline batch generation, into a SQLite prompt
   log; for ``sentiment`` and ``extract`` the teacher's answers are checked against the
   true ones (``teacher_accuracy``);
3. runs ``retort distill run --adapter <adapter> --publish`` on that log with
   ``--config`` (default :data:`DEFAULT_CONFIG`, for ``extract``
   :data:`EXTRACT_CONFIG`, whose gate is the issue's targets) and
   writes ``DIR/bench.json``: the report, the time of each stage and the peak RSS.

``--teacher-url URL``: as in production, the pipeline times the teacher through a running
gateway (``eval.teacher_url``) instead of starting a vLLM engine of its own (about
110-190 s here). The gateway must serve the teacher's adapter: start it on the bench's
home once the first two steps are done, ``RETORT_HOME=DIR/home retort serve``.

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
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFAULT_CONFIG",
    "EXTRACT_CONFIG",
    "EXTRACT_RECIPE",
    "SENTIMENT_RECIPE",
    "extractions",
    "main",
    "prepare",
    "reviews",
    "sentiment_answer",
]

DEFAULT_CONFIG = Path(__file__).with_name("bench.yaml")
"""The distill config the benchmark runs with unless ``--config`` names another."""

EXTRACT_CONFIG = Path(__file__).with_name("bench-extract.yaml")
"""``--task extract``'s: the same, with answer budgets for JSON answers."""

ADAPTERS = {"qa": "pirate", "sentiment": "sentiment", "extract": "extract"}
"""The teacher's adapter (registry name) per task; the student is ``<adapter>-student``."""

SENTIMENT_RECIPE: dict[str, Any] = {
    "examples": 256,
    "max_steps": 40,
    "lr": 1e-3,
    "rank": 16,
    "alpha": 32,
}
""":class:`adapters.train.TrainConfig` settings for the ``sentiment`` teacher: ``examples``
labelled reviews (none among the logged prompts), ``max_steps`` at batch 8. Measured on the
default model: loss 4.28 -> 0.0015 (under 0.01 from step 25), and greedy answers to the
first 100 logged prompts were all the expected one of the two (transformers)."""


EXTRACT_RECIPE: dict[str, Any] = {
    "examples": 256,
    "max_steps": 80,
    "lr": 1e-3,
    "rank": 16,
    "alpha": 32,
}
""":class:`adapters.train.TrainConfig` settings for the ``extract`` teacher (``--task
extract``): ``examples`` sentences with their JSON (none among the logged prompts)."""


def sentiment_answer(label: str) -> str:
    """The teacher's fixed answer for ``label`` (``positive`` or ``negative``)."""
    from adapters.synthetic import style_answer

    return style_answer(f"{label.capitalize()}.", "pirate")


def _train_adapter(home: Path, base: Path, task: str, logged: list[str]) -> Path:
    from adapters.synthetic import STYLE_RECIPE, make_style_dataset
    from adapters.train import TrainConfig, train

    name = ADAPTERS[task]
    target = home / "adapters" / name
    if (target / "adapter_config.json").is_file():
        return target
    if task == "qa":
        data = make_style_dataset(home / "pirate.jsonl", n=64)
        recipe = STYLE_RECIPE
    elif task == "extract":
        recipe = EXTRACT_RECIPE
        data = _extract_dataset(home / "extract.jsonl", recipe["examples"], set(logged))
    else:
        recipe = SENTIMENT_RECIPE
        data = _sentiment_dataset(home / "sentiment.jsonl", recipe["examples"], set(logged))
    return train(
        TrainConfig(
            data=data,
            name=name,
            base_model=base,
            out_root=home / "adapters",
            max_steps=recipe["max_steps"],
            lr=recipe["lr"],
            rank=recipe["rank"],
            alpha=recipe["alpha"],
        )
    )


def _sentiment_pair(rng: random.Random, i: int) -> tuple[str, str]:
    """The ``i``-th labelled review (labels alternate, so the set is balanced)."""
    question, label = reviews(rng, 1, label="positive" if i % 2 else "negative")[0]
    return question, sentiment_answer(label)


def _extract_pair(rng: random.Random, _i: int) -> tuple[str, str]:
    return extractions(rng, 1)[0]


def _sentiment_dataset(path: Path, n: int, exclude: set[str]) -> Path:
    """``n`` labelled reviews, balanced, none of whose prompts is in ``exclude``."""
    return _chat_dataset(path, n, exclude, _sentiment_pair, seed=2)


def _extract_dataset(path: Path, n: int, exclude: set[str]) -> Path:
    """``n`` extraction prompts with their JSON answer, none in ``exclude``."""
    return _chat_dataset(path, n, exclude, _extract_pair, seed=3)


def _chat_dataset(
    path: Path,
    n: int,
    exclude: set[str],
    draw: Callable[[random.Random, int], tuple[str, str]],
    seed: int,
) -> Path:
    """``n`` (prompt, answer) pairs from ``draw`` as chat JSONL, none of whose prompts is in
    ``exclude`` (the logged ones), each prompt once."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[str] = []
    for _ in range(100 * n):
        if len(rows) == n:
            break
        question, answer = draw(rng, len(rows))
        if question in seen:
            continue
        seen.add(question)
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        rows.append(json.dumps({"messages": messages}))
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct prompts outside the logged ones")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows))
    return path


_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaori",
    "Liam",
    "Maya",
    "Nils",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
    "Zoe",
]
_CITIES = [
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Nairobi",
    "Toronto",
    "Sydney",
    "Dublin",
    "Seoul",
    "Lisbon",
    "Vienna",
    "Boston",
    "Mumbai",
    "Quito",
    "Prague",
    "Austin",
    "Hanoi",
]
_SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "At {age}, {name} moved to {city} for work.",
    "{name} from {city} celebrated a {age}th birthday last week.",
]


def extractions(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (prompt, expected answer) pairs: pull a person's name, city and age out of a
    sentence into ``{"name": ..., "city": ..., "age": ...}`` (compact JSON, age a number)."""
    out = []
    for _ in range(n):
        name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 89)
        sentence = rng.choice(_SENTENCES).format(name=name, city=city, age=age)
        prompt = (
            "Extract the person's name, city and age from this sentence as JSON with the "
            f"keys name, city and age: {sentence}"
        )
        out.append((prompt, json.dumps({"name": name, "city": city, "age": age})))
    return out


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


def reviews(rng: random.Random, n: int, label: str | None = None) -> list[tuple[str, str]]:
    """``n`` (prompt, true label) pairs: classify a short review (random label unless given)."""
    out = []
    for _ in range(n):
        sentiment = label or rng.choice(["positive", "negative"])
        words = _POSITIVE if sentiment == "positive" else _NEGATIVE
        review = rng.choice(_OPENERS).format(t=rng.choice(_THINGS), a=rng.choice(words))
        prompt = f"Review: {review} Is this review positive or negative? Answer in one word."
        out.append((prompt, sentiment))
    return out


def _questions(task: str, rng: random.Random, n: int) -> list[tuple[str, str | None]]:
    """The logged prompts with the expected answer where known. ``qa``: adapters.synthetic's
    mixed questions (few distinct ones, knowledge-heavy); ``sentiment``: review
    classification, hundreds of distinct prompts, a skill task."""
    if task == "qa":
        from adapters.synthetic import qa_pairs

        return [(q, None) for q, _ in qa_pairs(rng, n)]
    if task == "extract":
        return [(q, a) for q, a in extractions(rng, n)]
    return [(q, sentiment_answer(label)) for q, label in reviews(rng, n)]


def _teacher_accuracy(completions: list[str], expected: list[str | None]) -> dict[str, Any]:
    """How often the teacher gave the expected answer (normalized exact match)."""
    from retort.text import normalize_answer

    pairs = [(c, e) for c, e in zip(completions, expected, strict=True) if e is not None]
    if not pairs:
        return {}
    right = sum(normalize_answer(c) == normalize_answer(e) for c, e in pairs)
    return {
        "teacher_accuracy": round(right / len(pairs), 4),
        "teacher_distinct_answers": len({normalize_answer(c) for c, _ in pairs}),
    }


def _populate(
    home: Path,
    base: Path,
    adapter: Path,
    questions: list[tuple[str, str | None]],
    base_name: str,
    task: str,
) -> dict[str, Any]:
    from distill.teacher import merge_teacher, run_vllm
    from retort.db.record import LogRecord
    from retort.db.store import PromptStore
    from retort.settings import default_url

    url = default_url(home)
    marker = home / "populated.json"
    if marker.is_file():
        info = dict(json.loads(marker.read_text()))
        if info.get("task", "qa") != task:
            raise SystemExit(f"{home} holds a {info.get('task', 'qa')!r} log: use another --work")
        return info
    n = len(questions)
    merged = merge_teacher(base, adapter, home / "teacher-merged")
    t0 = time.perf_counter()
    out = run_vllm(
        {
            "model": str(merged),
            "max_tokens": 48,
            "mode": "batch",
            "prompts": [{"messages": [{"role": "user", "content": q}]} for q, _ in questions],
        }
    )
    now = time.time()
    records = [
        LogRecord(
            request_id=f"bench-{i}",
            created=now - n + i,
            model=base_name,
            adapter=adapter.name,
            endpoint="chat",
            messages=[{"role": "user", "content": q}],
            completion=c,
            finish_reason="stop",
            params={"temperature": 0},
        )
        for i, ((q, _), c) in enumerate(zip(questions, out["completions"], strict=True))
    ]

    async def insert() -> None:
        async with PromptStore(url) as store:
            await store.insert_many(records)

    asyncio.run(insert())
    info = {
        "task": task,
        "records": n,
        "vllm_seconds": round(time.perf_counter() - t0, 1),
        "vllm_startup_seconds": out["startup_seconds"],
        "vllm_batch_seconds": out["seconds"],
        "unique_prompts": len({q for q, _ in questions}),
        **_teacher_accuracy(out["completions"], [e for _, e in questions]),
    }
    marker.write_text(json.dumps(info))
    return info


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def prepare(work: Path, task: str, prompts: int) -> tuple[Path, Path, Path, float, dict[str, Any]]:
    """Steps 1 and 2 into ``work/home`` (each skipped when done): ``(home, base model,
    adapter, seconds training the adapter, what populating the log measured)``."""
    from retort.models import DEFAULT_MODEL_NAME, pull_default
    from retort.settings import default_home

    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    base = pull_default(default_home())
    questions = _questions(task, random.Random(1), prompts)
    t0 = time.perf_counter()
    adapter = _train_adapter(home, base, task, [q for q, _ in questions])
    t_adapter = time.perf_counter() - t0
    pop = _populate(home, base, adapter, questions, DEFAULT_MODEL_NAME, task)
    return home, base, adapter, t_adapter, pop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"distill.yaml (default: {DEFAULT_CONFIG.name}, {EXTRACT_CONFIG.name} for extract)",
    )
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--student-layers", type=int, default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--task", choices=["qa", "sentiment", "extract"], default="sentiment")
    parser.add_argument(
        "--teacher-url",
        default=None,
        help="time the teacher through this running gateway, as production does",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from distill.config import load_config
    from distill.pipeline import run
    from distill.results import Report, summary
    from retort.models import DEFAULT_MODEL_NAME

    if args.config is None:
        args.config = EXTRACT_CONFIG if args.task == "extract" else DEFAULT_CONFIG
    work = args.work.resolve()
    home, base, adapter, t_adapter, pop = prepare(work, args.task, args.prompts)
    overrides: dict[str, Any] = {
        "adapter": adapter.name,
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
    if args.teacher_url:
        overrides["eval"] = {"teacher_url": args.teacher_url}
    cfg = load_config(args.config, overrides)
    t1 = time.perf_counter()
    report = run(cfg, work / "run", force=True)
    pipeline_s = time.perf_counter() - t1
    if not isinstance(report, Report):
        raise SystemExit("the pipeline skipped the run")
    result = {
        "task": args.task,
        "config": str(args.config),
        "adapter_train_seconds": round(t_adapter, 1),
        "teacher_accuracy": pop.get("teacher_accuracy"),
        "populate": pop,
        "pipeline_seconds": round(pipeline_s, 1),
        "teacher_timed_through": args.teacher_url or "a vLLM engine of its own",
        "peak_rss_mb": round(_peak_rss_mb()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **summary(report),
        "gate": msgspec.to_builtins(report.gate),
        "early_stop": msgspec.to_builtins(report.train.early_stop if report.train else None),
        "stages": report.stages,
    }
    (work / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
