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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill.config import TeacherConfig
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


def _relabel(teacher_dir: Path, src: Path, dst: Path, max_tokens: int) -> dict[str, Any]:
    from datasets import load_from_disk

    splits = {name: load_from_disk(str(src / name)) for name in ("train", "eval")}
    items = [
        {"messages": ex["messages"], "prompt": ex["prompt"]}
        for name in ("train", "eval")
        for ex in splits[name]
    ]
    out = run_vllm(
        {"model": str(teacher_dir), "prompts": items, "max_tokens": max_tokens, "mode": "batch"}
    )
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
    return {k: out[k] for k in ("startup_seconds", "seconds", "tokens")}


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
) -> dict[str, Any]:
    """Merge the teacher into ``run_dir/teacher/model`` and decide (and make) its labels.

    Returns ``{"model": merged folder, "labels": dataset folder, "relabelled": bool, ...}``.
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
    done = stage_done(stage, inputs)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    merged = merge_teacher(base_dir, adapter_dir, stage / "model")
    result: dict[str, Any] = {
        "model": str(merged),
        "base_model": served_model,
        "adapter": adapter,
        "relabelled": relabel,
        "merge_seconds": round(time.perf_counter() - t0, 2),
        "labels": str(run_dir / "dataset"),
    }
    if relabel:
        labels = run_dir / "labels"
        labels.mkdir(parents=True, exist_ok=True)
        result["relabel"] = _relabel(merged, run_dir / "dataset", labels, config.max_tokens)
        result["labels"] = str(labels)
    write_stage(stage, inputs, result)
    return result
