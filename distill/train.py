"""Stage 4, train: token-level KD on the merged teacher's logits, mixed with CE.

The same script runs in-process, as ``python -m distill.train SPEC.json`` or under
``accelerate launch --multi_gpu --num_processes N -m distill.train SPEC.json`` (DDP; on a
machine without CUDA the processes run on the CPU over gloo; FSDP and DeepSpeed through
accelerate's own config). Every process draws the same seeded global
batch order and takes its own share of each batch, so a run is deterministic, resumable
from a checkpoint by step number, and independent of how many processes share the work.

Per step: ``batch_size`` examples split over processes and ``grad_accum`` micro-batches;
loss ``alpha * KD + (1 - alpha) * CE`` on the completion tokens (:mod:`distill.losses`);
AdamW with linear warmup, gradient clipping; with ``checkpoint_every``, a checkpoint
(``accelerator.save_state``: model, optimizer, scheduler, RNG) every that many steps and at
the end, the latest kept: a rerun resumes from it, also to extend training to more steps;
``train_log.json`` and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from distill.config import TrainConfig
from distill.stages import stage_done, write_stage

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["TrainError", "encode_example", "main", "train_kd", "train_stage"]


class TrainError(RuntimeError):
    """Training failed or had nothing to learn."""


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], max_len: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels only on the completion (and its end marker)."""
    from adapters.data import IGNORE_INDEX, encode_chat

    if example.get("messages"):
        messages = [*example["messages"], {"role": "assistant", "content": example["completion"]}]
        enc = encode_chat(tokenizer, messages, max_len)
        return enc.input_ids, enc.labels
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    ids = (list(prompt) + list(completion))[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + list(completion))[:max_len]
    return ids, labels


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    from adapters.data import IGNORE_INDEX

    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": ids_t, "attention_mask": mask, "labels": labels}


def _order(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """The global batch of ``step`` (1-based): a fresh seeded shuffle every epoch."""
    import torch

    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, pos = divmod(step - 1, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batch = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(batch) < batch_size:  # top up the epoch's last batch from its start
        batch += perm[: batch_size - len(batch)]
    return batch


def _plot(log: list[dict[str, float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in log]
    for key in ("loss", "kd", "ce"):
        ax.plot(steps, [r[key] for r in log], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    found = [
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("step-*")
        if p.is_dir() and (p / "done").is_file()
    ]
    return max(found) if found else None


def train_kd(spec: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Train per ``spec`` (teacher, student, data, out, config); returns the train log.

    Works the same in one process and in each process of ``accelerate launch``.
    """
    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data import IGNORE_INDEX
    from adapters.train import training_progress
    from distill.losses import distill_loss

    cfg = msgspec.convert(spec["config"], TrainConfig)
    out = Path(spec["out"])
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available()
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = load_from_disk(str(Path(spec["data"]) / "train")).to_list()
    examples = [encode_example(tokenizer, r, cfg.max_len) for r in rows]
    examples = [e for e in examples if any(x != IGNORE_INDEX for x in e[1][1:])]
    if not examples:
        raise TrainError("no completion tokens to learn from")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if micro < 1:
        raise TrainError(
            f"batch_size {cfg.batch_size} is smaller than processes x grad_accum "
            f"({world} x {cfg.grad_accum})"
        )
    global_batch = micro * world * cfg.grad_accum

    dtype = torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=dtype)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=dtype)
    student.config.use_cache = False
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(0, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)

    ckpt_root = out / "checkpoints"
    start = 0
    log: list[dict[str, float]] = []
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        start, path = latest
        accelerator.load_state(str(path))
        log = json.loads((path / "log.json").read_text())

    def checkpoint(step: int) -> None:
        path = ckpt_root / f"step-{step}"
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (path / "log.json").write_text(json.dumps(log))
            (path / "done").write_text(str(step))
            for old in ckpt_root.glob("step-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    bar = training_progress(progress and accelerator.is_main_process)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task(
            "distilling",
            total=cfg.max_steps,
            completed=start,
            loss=log[-1]["loss"] if log else float("nan"),
        )
        for step in range(start + 1, cfg.max_steps + 1):
            batch_idx = _order(len(examples), cfg.seed, step, global_batch)
            mine = batch_idx[rank * micro * cfg.grad_accum : (rank + 1) * micro * cfg.grad_accum]
            sums = torch.zeros(3, device=accelerator.device)
            for k in range(cfg.grad_accum):
                part = [examples[i] for i in mine[k * micro : (k + 1) * micro]]
                b = {key: v.to(accelerator.device) for key, v in _collate(part, pad_id).items()}
                with accelerator.accumulate(student):
                    logits = student(
                        input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                    ).logits
                    with torch.no_grad():
                        t_logits = teacher(
                            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                        ).logits
                    targets = b["labels"][:, 1:]
                    mask = targets != IGNORE_INDEX
                    loss, kd, ce = distill_loss(
                        logits[:, :-1],
                        t_logits[:, :-1],
                        targets.clamp_min(0),
                        mask,
                        kind=cfg.loss,
                        alpha=cfg.alpha,
                        temperature=cfg.temperature,
                        beta=cfg.beta,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([loss.detach(), kd.detach(), ce.detach()]) / cfg.grad_accum
            mean = accelerator.reduce(sums, reduction="mean")
            row = {
                "step": step,
                "loss": float(mean[0]),
                "kd": float(mean[1]),
                "ce": float(mean[2]),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.append(row)
            bar.update(task, advance=1, loss=row["loss"])
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
                checkpoint(step)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    result: dict[str, Any] = {
        "steps": cfg.max_steps,
        "resumed_from": start,
        "processes": world,
        "global_batch": global_batch,
        "examples": len(examples),
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, cfg.max_steps - start), 3),
        "initial_loss": log[0]["loss"] if log else None,
        "final_loss": log[-1]["loss"] if log else None,
        "model": str(out / "final"),
    }
    if accelerator.is_main_process:
        final = out / "final"
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model: Any = accelerator.unwrap_model(student)
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        src = Path(spec["student"])
        for name in ("chat_template.jinja", "generation_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (out / "train_log.json").write_text(json.dumps({**result, "log": log}, indent=2))
        _plot(log, out / "loss.png", f"KD ({cfg.loss}, alpha {cfg.alpha}, T {cfg.temperature})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def train_stage(
    teacher_dir: Path,
    student_dir: Path,
    data_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train into ``run_dir/train`` (``final/`` is the student); skipped when done."""
    stage = run_dir / "train"
    spec = {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "data": str(data_dir),
        "out": str(stage),
        "config": msgspec.to_builtins(config),
    }
    done = stage_done(stage, spec)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    if config.num_processes <= 1:
        result = train_kd(spec, progress=progress)
    else:
        spec_path = stage / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        # --multi_gpu launches through torchrun; without CUDA the script's
        # Accelerator(cpu=True) makes it DDP on gloo. (accelerate's --cpu would run a single
        # process: its multi-CPU launcher needs an MPI hostfile.)
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(config.num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "distill.train",
            str(spec_path),
        ]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            raise TrainError(f"accelerate launch failed with exit code {proc.returncode}")
        result = {
            k: v
            for k, v in json.loads((stage / "train_log.json").read_text()).items()
            if k != "log"
        }
    write_stage(stage, spec, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.train SPEC.json`` (also under ``accelerate launch``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m distill.train SPEC.json", file=sys.stderr)
        return 2
    train_kd(json.loads(Path(args[0]).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
