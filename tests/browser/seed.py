"""A small prompt log for the console's tests: chat requests of a base model, two adapters
and a student, over the last two hours, some failed, some rated."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from retort.db.record import LogRecord
from retort.db.store import PromptStore

__all__ = ["SEED_ADAPTER", "seed_adapter", "seed_log", "seed_records", "seed_student"]

SEED_ADAPTER = "support"
"""The adapter whose unrated requests make the rating queue."""


def seed_records(
    n: int = 30, *, model: str = "fake-model", now: float | None = None
) -> list[LogRecord]:
    now = time.time() if now is None else now
    out = []
    for i in range(n):
        adapter = (SEED_ADAPTER, None, "sql")[i % 3]
        student = i % 10 == 9
        out.append(
            LogRecord(
                request_id=f"req-{i:03d}",
                created=now - 7200 + i * 60,
                model="bot-student" if student else model,
                endpoint="chat",
                adapter=None if student else adapter,
                served_by="student" if student else "engine",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
                ],
                params={"temperature": 0.0, "max_tokens": 16},
                completion=f"The answer is {2 * i}.",
                finish_reason="stop",
                prompt_tokens=12 + i,
                completion_tokens=5,
                ttft_s=0.01 + i / 1000,
                latency_s=0.05 + i / 100,
                cost_usd=1e-6 * (i + 1),
                status="error" if i % 7 == 6 else "ok",
                error="engine overloaded" if i % 7 == 6 else None,
                tags={"team": "support"} if adapter == SEED_ADAPTER else {},
            )
        )
    return out


async def seed_log(
    url: str, n: int = 30, *, model: str = "fake-model", rated: int = 2
) -> list[LogRecord]:
    """Create (migrate) the log at ``url``, insert ``n`` records, rate the first ``rated``
    of the adapter's queue (so the queue starts after them)."""
    records = seed_records(n, model=model)
    async with PromptStore(url) as store:
        await store.insert_many(records)
        queue = [r for r in records if r.adapter == SEED_ADAPTER]
        for r in queue[:rated]:
            await store.add_feedback(r.request_id, 1.0, "seeded")
    return records


def seed_student(root: Path, name: str = "bot-student", *, png: bytes | None = None) -> Path:
    """A student folder as ``retort distill publish`` leaves it: manifest, an
    onnxruntime-genai folder (placeholder weights: the console never loads it) and its
    report (json, md, png)."""
    import msgspec

    from gateway.students import MANIFEST_FILE, StudentManifest

    folder = root / name
    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    (folder / "onnx" / "genai_config.json").write_text('{"model": {"context_length": 64}}')
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 4096)
    report: dict[str, Any] = {
        "student_model": name,
        "teacher_params": 134515008,
        "student_params": 63000000,
        "param_ratio": 0.468,
        "agreement": 0.97,
        "rouge_l": 0.95,
        "teacher_tokens_per_s": 41.5,
        "student_tokens_per_s": 440.2,
        "gate_passed": True,
    }
    manifest = StudentManifest(
        name=name,
        teacher_model="fake-model",
        adapter=SEED_ADAPTER,
        precision="int4",
        created=time.time(),
        report=report,
    )
    (folder / MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    if png is None:  # the real report writer: report.json, report.md, report.png
        from distill.report import write_report
        from distill.results import Report

        full = {**report, "teacher_model": "fake-model", "adapter": SEED_ADAPTER}
        write_report(folder, msgspec.convert(full, Report))
    else:
        (folder / "report.json").write_bytes(msgspec.json.encode(report))
        (folder / "report.png").write_bytes(png)
    return folder


def seed_adapter(raw: Path, *, base_model: str = "fake-model", rank: int = 8) -> Path:
    """A raw peft LoRA folder (rank ``rank`` on q_proj and v_proj of two layers, random
    weights) written with numpy and safetensors only: no torch, so it takes milliseconds.
    Valid for a base the registry knows only by name (the fake engine's model)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    hidden = 64
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, hidden), np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((hidden, rank), np.float32)
    raw.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(raw / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": base_model,
    }
    (raw / "adapter_config.json").write_text(json.dumps(config))
    return raw
