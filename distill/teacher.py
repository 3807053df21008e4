"""Stage 2, teacher: the served base model with its adapter merged in, and its labels.

The merged teacher (peft ``merge_and_unload``, float32 safetensors) is what training takes
logits from and what the student's layers are copied from. Labels: by default the logged
completions are kept (sequence-level KD); with ``relabel`` (or when the logs came from
another model than this teacher) every prompt is answered again, greedily, by vLLM offline
batch generation on the merged teacher, and the relabelled splits go to ``run/labels``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill.config import EvalConfig, TeacherConfig
from distill.results import RelabelInfo, Speed, TeacherResult
from distill.stages import stage_done, write_stage

__all__ = ["TeacherError", "merge_teacher", "relabelled_target", "run_vllm", "teacher_stage"]


class TeacherError(RuntimeError):
    """The teacher cannot be built or run."""


def merge_teacher(base_dir: Path, adapter_dir: Path | None, out: Path) -> Path:
    """Write base (+ adapter merged) as float32 safetensors with the tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.config.dtype = "float32"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(tmp))
    for name in ("chat_template.jinja", "generation_config.json"):
        if (base_dir / name).is_file() and not (tmp / name).exists():
            shutil.copy2(base_dir / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def run_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :mod:`distill.vllm_worker` on ``spec`` in a subprocess; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="retort-vllm-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "distill.vllm_worker", str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not out_path.is_file():
            raise TeacherError(f"vLLM worker failed: {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        return result


def relabelled_target(example: dict[str, Any], relabelled: str) -> str:
    """A relabelled example's target: a reviewer's correction stays, else the teacher's."""
    return str(example["completion"]) if example.get("corrected") else relabelled


def _relabel(
    teacher_dir: Path, src: Path, dst: Path, max_tokens: int, speed: EvalConfig | None
) -> tuple[RelabelInfo, Speed | None]:
    """Relabel every prompt with vLLM offline batch generation; with ``speed``, time the
    teacher on the same engine afterwards (the eval split's first ``speed.speed_prompts``,
    exactly ``speed.max_tokens`` each, one at a time), so eval need not start vLLM again."""
    from datasets import load_from_disk

    splits = {name: load_from_disk(str(src / name)) for name in ("train", "eval")}
    items = [
        {"messages": ex["messages"], "prompt": ex["prompt"]}
        for name in ("train", "eval")
        for ex in splits[name]
    ]
    spec: dict[str, Any] = {
        "model": str(teacher_dir),
        "prompts": items,
        "max_tokens": max_tokens,
        "mode": "batch",
    }
    timed = [
        {"messages": ex["messages"], "prompt": ex["prompt"]}
        for ex in list(splits["eval"])[: speed.speed_prompts if speed else 0]
    ]
    if speed is not None and timed:
        spec["speed"] = {"prompts": timed, "max_tokens": speed.max_tokens}
    out = run_vllm(spec)
    completions = iter(out["completions"])
    for name, ds in splits.items():
        # A reviewer's correction stays the target (the teacher's answer was judged wrong).
        new = ds.map(
            lambda ex: {"completion": relabelled_target(ex, next(completions))},
            load_from_cache_file=False,
        )
        tmp = dst / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        new.save_to_disk(str(tmp))
        shutil.rmtree(dst / name, ignore_errors=True)
        tmp.rename(dst / name)
    info = RelabelInfo(
        startup_seconds=out["startup_seconds"], seconds=out["seconds"], tokens=out["tokens"]
    )
    timing = out.get("speed")
    if not timing:
        return info, None
    return info, Speed(
        engine="vllm-cpu",
        tokens_per_s=timing["tokens_per_s"],
        latency_p50_s=statistics.median(timing["latencies"]),
        startup_seconds=out["startup_seconds"],
        source="label",
    )


def teacher_stage(
    base_dir: Path,
    adapter_dir: Path | None,
    run_dir: Path,
    config: TeacherConfig,
    *,
    served_model: str,
    adapter: str | None,
    dataset_models: dict[str, int],
    dataset_fingerprint: str,
    speed: EvalConfig | None = None,
) -> TeacherResult:
    """Merge the teacher into ``run_dir/teacher/model`` and decide (and make) its labels.

    With ``speed`` (eval's settings, when the teacher's speed is measured on vLLM) and a
    relabelling, the labelling engine also times the teacher.
    """
    stage = run_dir / "teacher"
    relabel = config.relabel
    if relabel is None:
        relabel = any(m != served_model for m in dataset_models)
    inputs = {
        "base": str(base_dir),
        "adapter": str(adapter_dir),
        "config": config,
        "relabel": relabel,
        "dataset": dataset_fingerprint,
    }
    if relabel and speed is not None:
        inputs["speed"] = [speed.speed_prompts, speed.max_tokens]
    done = stage_done(stage, inputs, TeacherResult)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    merged = merge_teacher(base_dir, adapter_dir, stage / "model")
    result = TeacherResult(
        model=str(merged),
        base_model=served_model,
        adapter=adapter,
        relabelled=relabel,
        merge_seconds=round(time.perf_counter() - t0, 2),
        labels=str(run_dir / "dataset"),
    )
    if relabel:
        labels = run_dir / "labels"
        labels.mkdir(parents=True, exist_ok=True)
        result.relabel, result.speed = _relabel(
            merged, run_dir / "dataset", labels, config.max_tokens, speed
        )
        result.labels = str(labels)
    write_stage(stage, inputs, result)
    return result
