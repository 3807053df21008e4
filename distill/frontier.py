"""The size/agreement frontier of students (issue #12, item 2): ``python -m distill.frontier``.

On the distillation benchmark's log (:func:`distill.bench.prepare`: the ``sentiment``
teacher and its logged answers, in ``--work``), each recipe of :data:`RECIPES` (``--recipes``
picks some, in order) runs the pipeline up to eval with ``distill/bench.yaml`` plus the
recipe's overrides, into ``WORK/frontier/NAME``: fewer layers, MLP or hidden width pruned
(:mod:`distill.prune`), int4 or int8 export. The teacher's speed is not timed (it does not
depend on the student). After each point ``WORK/frontier.json`` (every point: its recipe,
parameters against the teacher's, agreement on the held-out prompts, ONNX size, training
steps and seconds, the load average) and ``WORK/frontier.png`` are rewritten, so a long
sweep can be stopped at any point and what it measured is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["RECIPES", "chart", "main", "point"]

_SMALL = {
    "max_steps": 150,
    "early_stop": {"every": 10, "examples": 32, "patience": 3, "min_steps": 80, "max_tokens": 16},
}
"""Training for the small recipes: students under half the teacher's depth or width spend
their first 40-60 steps answering one label for everything (agreement about 0.5 on the
slice), so the early stop may not end them before step 80, and it judges on 32 held-out
train prompts instead of 16 (a slice at 1.0 of 16 still left 96 % on the 50 eval prompts)."""

_TEN = {
    "max_steps": 150,
    "early_stop": {"every": 10, "examples": 16, "patience": 2, "min_steps": 30, "max_tokens": 16},
}
"""Training for the 10-layer student (the default before the frontier; section 6b)."""

RECIPES: dict[str, dict[str, Any]] = {
    "L10-int4": {"student": {"layers": 10}, "train": _TEN},
    "L5-int4": {"student": {"layers": 5}, "train": _SMALL},
    "L4-int4": {"student": {"layers": 4}, "train": _SMALL},
    "L3-int4": {"student": {"layers": 3}, "train": _SMALL},
    "L8-I768-int4": {"student": {"layers": 8, "intermediate_size": 768}, "train": _SMALL},
    "L10-H396-int4": {"student": {"layers": 10, "hidden_size": 396}, "train": _SMALL},
    "L6-I768-H396-int4": {
        "student": {"layers": 6, "intermediate_size": 768, "hidden_size": 396},
        "train": _SMALL,
    },
    "L5-int4-long": {
        "student": {"layers": 5},
        "train": {
            "max_steps": 80,
            "early_stop": {"every": 10, "examples": 16, "patience": 8, "max_tokens": 16},
        },
    },
    "L5-int8": {"student": {"layers": 5}, "export": {"precision": "int8"}, "train": _SMALL},
    "L8-I768-int8": {
        "student": {"layers": 8, "intermediate_size": 768},
        "export": {"precision": "int8"},
        "train": _SMALL,
    },
}
"""Recipe name -> distill config overrides (on top of ``distill/bench.yaml``). The name
reads: ``L`` layers kept of the teacher's 30, ``I`` MLP width (of 1536), ``H`` hidden width
(of 576), then the export precision; ``-long``: the first session's point (80 steps, early
stop after 8 evaluations without a rise)."""


def point(name: str, recipe: dict[str, Any], report: Any) -> dict[str, Any]:
    """One frontier point from a pipeline report."""
    train = report.train
    return {
        "name": name,
        "recipe": recipe,
        "student_params": report.student_params,
        "teacher_params": report.teacher_params,
        "param_ratio": round(report.param_ratio, 4) if report.param_ratio else None,
        "agreement": report.agreement,
        "exact_agreement": report.exact_agreement,
        "rouge_l": report.rouge_l,
        "eval_examples": report.eval.examples if report.eval else None,
        "precision": report.precision,
        "onnx_bytes": report.student_size_bytes,
        "student_tokens_per_s": report.student_tokens_per_s,
        "train_steps": train.steps if train else None,
        "train_seconds": train.train_seconds if train else None,
        "stages": report.stages,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def chart(path: Path, points: list[dict[str, Any]], *, target: tuple[float, float]) -> None:
    """Agreement against the parameter ratio, one labelled dot per point; the target's
    corner (at most ``target[0]`` of the parameters, at least ``target[1]`` agreement)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    max_ratio, min_agree = target
    ax.axvspan(0, max_ratio, ymin=0, ymax=1, color="tab:green", alpha=0.06)
    ax.axvline(max_ratio, color="tab:green", linestyle="--", linewidth=1)
    ax.axhline(min_agree, color="tab:green", linestyle="--", linewidth=1)
    placed: list[tuple[float, float]] = []
    for p in points:
        if p["param_ratio"] is None or p["agreement"] is None:
            continue
        xy = (p["param_ratio"], p["agreement"])
        color = "tab:blue" if p["precision"] == "int4" else "tab:orange"
        ax.scatter(*xy, color=color)
        # Labels of points close together are stacked instead of drawn over each other.
        near = sum(abs(x - xy[0]) < 0.06 and abs(y - xy[1]) < 0.01 for x, y in placed)
        placed.append(xy)
        ax.annotate(
            p["name"], xy, fontsize=7, xytext=(3, 3 - 10 * near), textcoords="offset points"
        )
    ax.set_xlabel("student / teacher parameters")
    ax.set_ylabel("agreement with the teacher (held-out)")
    ax.set_title("Students: size against agreement (blue int4, orange int8)")
    ax.set_xlim(0, 0.55)
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--config", type=Path, default=None, help="default: distill/bench.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from distill.bench import DEFAULT_CONFIG, prepare
    from distill.config import load_config
    from distill.pipeline import run
    from distill.results import Report
    from retort.models import DEFAULT_MODEL_NAME

    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    work = args.work.resolve()
    home, base, adapter, _, pop = prepare(work, "sentiment", args.prompts)
    out_json = work / "frontier.json"
    done: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    points: list[dict[str, Any]] = done.get("points", [])
    for name in names:
        recipe = RECIPES[name]
        overrides: dict[str, Any] = {
            "adapter": adapter.name,
            "home": str(home),
            "teacher": {"base_model": str(base), "base_model_name": DEFAULT_MODEL_NAME},
            "eval": {"teacher_speed": "skip"},
        }
        for key, value in recipe.items():
            overrides[key] = {**overrides.get(key, {}), **value}
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        t0 = time.perf_counter()
        report = run(cfg, work / "frontier" / name, until="eval", record=False)
        if not isinstance(report, Report):
            raise SystemExit("the pipeline skipped the run")
        p = point(name, recipe, report)
        p["seconds"] = round(time.perf_counter() - t0, 1)
        points = [q for q in points if q["name"] != name] + [p]
        result = {
            "task": "sentiment",
            "config": str(args.config or DEFAULT_CONFIG),
            "teacher_accuracy": pop.get("teacher_accuracy"),
            "target": {"max_param_ratio": 0.35, "min_agreement": 0.98},
            "points": points,
        }
        out_json.write_text(json.dumps(result, indent=2))
        chart(work / "frontier.png", points, target=(0.35, 0.98))
        print(json.dumps(p), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
