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

Early stop (``early_stop.every`` > 0): the ``early_stop.examples`` train prompts with the
lowest prompt hashes are held out of training; every ``every`` steps the student answers them
greedily and its mean agreement with the teacher's answers is taken under the run's measure
(:mod:`distill.measure`: exact, JSON, or for open text the teacher's likelihood of the
answer). Training stops when :func:`should_stop` says so (never before
``early_stop.min_steps``, nor while agreement has never left 0), and the best evaluated
weights are the ones saved. (A resumed run starts its evaluation history afresh.)

Past ~400 lines on purpose: one trainer, read top to bottom (DESIGN.md allows it).
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

from distill.config import EarlyStopConfig, TrainConfig
from distill.results import EarlyStopInfo, Measure, TrainResult, TrainSpec
from distill.stages import stage_done, write_stage

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TrainError",
    "encode_example",
    "main",
    "prompt_ids",
    "should_stop",
    "train_kd",
    "train_stage",
]


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


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> list[int]:
    """The prompt's token ids, ready for the answer (chat template applied for chat)."""
    from distill.export import chat_ids

    if example.get("messages"):
        return chat_ids(tokenizer, example["messages"])
    return list(tokenizer(example["prompt"], add_special_tokens=False)["input_ids"])


def should_stop(
    history: Sequence[float],
    patience: int,
    min_delta: float = 0.0,
    *,
    step: int | None = None,
    min_steps: int = 0,
) -> bool:
    """The early-stop rule over held-out agreements so far (one per evaluation), at training
    step ``step``: never before ``min_steps``, and never while the best agreement is still
    0 (the student has learned nothing yet: stopping would keep noise); otherwise stop when
    none of the last ``patience`` rose more than ``min_delta`` above the best before them.
    Agreement 1 on the slice is no exception: the sentiment student stopped at its first 1
    (16 prompts, step 30) agreed on only 86 % of the eval prompts; ``patience`` more
    evaluations at 1 are what says it has settled. But at 1 no later evaluation can rise,
    so waiting out the whole ``patience`` there only spends steps: two evaluations in a row
    at 1 settle it (the 300-prompt sentiment run was at 1 at steps 30, 40 and 50: the third
    evaluation cost 10 more steps, about 38 s, and could only confirm)."""
    if not history or max(history) <= 0.0:
        return False
    if step is not None and step < min_steps:
        return False
    if patience < 1:
        return False
    if len(history) >= 2 and min(history[-2:]) >= 1.0:
        return True
    if len(history) <= patience:
        return False
    return max(history[-patience:]) <= max(history[:-patience]) + min_delta


class _HeldOut:
    """The early-stop slice and how to score the student on it."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer: Any,
        teacher: Any,
        cfg: EarlyStopConfig,
        measure: Measure,
    ) -> None:
        from distill.measure import answer_logprob

        self.rows, self.tokenizer, self.teacher = rows, tokenizer, teacher
        self.cfg, self.measure = cfg, measure
        self.prompts = [prompt_ids(tokenizer, r) for r in rows]
        self.own = (
            [answer_logprob(teacher, tokenizer, r, r["completion"]) for r in rows]
            if measure == "open"
            else []
        )

    def score(self, model: Any) -> float:
        """Mean agreement of ``model``'s greedy answers with the teacher's (0..1)."""
        from distill.export import greedy_ids
        from distill.measure import answer_logprob, likelihood_ratio, score_pair

        was_training = model.training
        model.eval()
        try:
            outs = greedy_ids(
                model, self.prompts, self.cfg.max_tokens, batch_size=len(self.prompts)
            )
        finally:
            model.train(was_training)
        total = 0.0
        for i, (row, ids) in enumerate(zip(self.rows, outs, strict=True)):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            likelihood = None
            if self.measure == "open":
                lp = answer_logprob(self.teacher, self.tokenizer, row, text)
                likelihood = likelihood_ratio(lp, self.own[i])
            total += score_pair(self.measure, row["completion"], text, likelihood, 1.0)[0]
        return total / max(1, len(self.rows))


class _TeacherCache:
    """The teacher's logits at each example's completion positions, kept after its first
    forward pass, up to ``budget`` bytes. The teacher is frozen and in eval mode, so a batch
    whose examples are all cached needs no teacher forward: every epoch after the first
    costs the student's passes only (the teacher's 30 layers were about two thirds of a
    5-layer student's step)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.rows: dict[int, torch.Tensor] = {}
        self.forwards = self.cached = 0

    def logits(
        self,
        teacher: Any,
        b: dict[str, torch.Tensor],
        keep: torch.Tensor,
        mask: torch.Tensor,
        ids: list[int],
    ) -> torch.Tensor:
        """The teacher's logits for the batch at positions ``keep`` (exact at the positions
        ``mask`` sets; the others, which the losses never read, are 0 when cached)."""
        import torch

        if self.budget > 0 and all(i in self.rows for i in ids):
            first = self.rows[ids[0]]
            out = torch.zeros((*mask.shape, first.shape[-1]), dtype=first.dtype)
            for r, i in enumerate(ids):
                out[r, mask[r]] = self.rows[i]
            self.cached += 1
            return out.to(mask.device)
        with torch.no_grad():
            t_logits: torch.Tensor = teacher(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep
            ).logits
        self.forwards += 1
        for r, i in enumerate(ids):
            if self.budget <= 0 or i in self.rows:
                continue
            row = t_logits[r, mask[r]].detach().to("cpu", copy=True)
            size = row.numel() * row.element_size()
            if self.used + size <= self.budget:
                self.rows[i] = row
                self.used += size
        return t_logits


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


def _completion_span(labels: torch.Tensor) -> torch.Tensor:
    """The logit positions that predict a completion token of any row of the batch (the
    span from the first to the last): the position ``j`` predicts ``labels[:, j + 1]``.
    Both models run their LM head (49,152 x 576 here: a third of a small student's step)
    and the losses their softmax over the vocabulary only there, not over the prompts."""
    import torch

    from adapters.data import IGNORE_INDEX

    rows = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()
    if rows.numel() == 0:
        return torch.arange(0)
    return torch.arange(int(rows[0]), int(rows[-1]) + 1)


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


def train_kd(spec: TrainSpec, *, progress: bool = True) -> TrainResult:
    """Train per ``spec``; returns the result (the step log goes to ``train_log.json``).

    Works the same in one process and in each process of ``accelerate launch``.
    """
    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data import IGNORE_INDEX
    from adapters.train import training_progress
    from distill.losses import distill_loss

    cfg = spec.config
    out = Path(spec.out)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available()
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.student)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = load_from_disk(str(Path(spec.data) / "train")).to_list()
    es = cfg.early_stop
    held_rows: list[dict[str, Any]] = []
    if es.every > 0:
        if len(rows) <= es.examples:
            raise TrainError(
                f"early stop holds out {es.examples} of {len(rows)} train examples: "
                "lower train.early_stop.examples or add data"
            )
        by_hash = sorted(range(len(rows)), key=lambda i: str(rows[i].get("prompt_hash") or i))
        held = set(by_hash[: es.examples])
        held_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
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
    teacher = AutoModelForCausalLM.from_pretrained(spec.teacher, dtype=dtype)
    teacher.to(accelerator.device).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(spec.student, dtype=dtype)
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

    held_out = _HeldOut(held_rows, tokenizer, teacher, es, spec.measure) if held_rows else None
    cache = _TeacherCache(cfg.teacher_cache_mb * 1_000_000)
    history: list[tuple[int, float]] = []
    best: tuple[int, float, dict[str, Any] | None] = (start, -1.0, None)
    stopped_at: int | None = None
    eval_s = 0.0
    last = start
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
                ids = mine[k * micro : (k + 1) * micro]
                part = [examples[i] for i in ids]
                b = {key: v.to(accelerator.device) for key, v in _collate(part, pad_id).items()}
                keep = _completion_span(b["labels"])
                targets = b["labels"][:, 1:][:, keep]
                mask = targets != IGNORE_INDEX
                with accelerator.accumulate(student):
                    logits = student(
                        input_ids=b["input_ids"],
                        attention_mask=b["attention_mask"],
                        logits_to_keep=keep,
                    ).logits
                    t_logits = cache.logits(
                        teacher, b, keep, mask, mine[k * micro : (k + 1) * micro]
                    )
                    loss, kd, ce = distill_loss(
                        logits,
                        t_logits,
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
            last = step
            stop = False
            if held_out is not None and step % es.every == 0:
                t_eval = time.perf_counter()
                model_now: Any = accelerator.unwrap_model(student)
                agreement = held_out.score(model_now)
                history.append((step, round(agreement, 4)))
                if best[2] is None or agreement >= best[1]:  # a tie: the later, trained more
                    state = {k: v.detach().clone() for k, v in model_now.state_dict().items()}
                    best = (step, agreement, state)
                # at max_steps training ends anyway: stopped_at says the rule ended it early
                stop = step < cfg.max_steps and should_stop(
                    [a for _, a in history],
                    es.patience,
                    es.min_delta,
                    step=step,
                    min_steps=es.min_steps,
                )
                eval_s += time.perf_counter() - t_eval
            if cfg.checkpoint_every and (
                step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop
            ):
                checkpoint(step)
            if stop:
                stopped_at = step
                break
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    early = None
    if held_out is not None:
        early = EarlyStopInfo(
            every=es.every,
            examples=len(held_rows),
            history=history,
            best_step=best[0],
            best_agreement=round(max(best[1], 0.0), 4),
            stopped_at=stopped_at,
            seconds=round(eval_s, 2),
        )
    result = TrainResult(
        steps=last,
        resumed_from=start,
        processes=world,
        global_batch=global_batch,
        examples=len(examples),
        train_seconds=round(seconds, 2),
        seconds_per_step=round((seconds - eval_s) / max(1, last - start), 3),
        initial_loss=log[0]["loss"] if log else None,
        final_loss=log[-1]["loss"] if log else None,
        model=str(out / "final"),
        early_stop=early,
        teacher_forwards=cache.forwards,
        teacher_cached=cache.cached,
    )
    model: Any = accelerator.unwrap_model(student)
    if best[2] is not None and best[0] != last:
        model.load_state_dict(best[2])  # the best evaluated weights, not the last
    if accelerator.is_main_process:
        final = out / "final"
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        src = Path(spec.student)
        for name in ("chat_template.jinja", "generation_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        record = {**msgspec.to_builtins(result), "log": log}
        (out / "train_log.json").write_text(json.dumps(record, indent=2))
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
    measure: Measure = "exact",
    progress: bool = True,
) -> TrainResult:
    """Train into ``run_dir/train`` (``final/`` is the student); skipped when done.
    ``measure`` is how early stopping compares answers (:data:`distill.results.Measure`)."""
    stage = run_dir / "train"
    spec = TrainSpec(
        teacher=str(teacher_dir),
        student=str(student_dir),
        data=str(data_dir),
        out=str(stage),
        config=config,
        measure=measure,
    )
    done = stage_done(stage, spec, TrainResult)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    if config.num_processes <= 1:
        result = train_kd(spec, progress=progress)
    else:
        spec_path = stage / "spec.json"
        spec_path.write_bytes(msgspec.json.format(msgspec.json.encode(spec), indent=2))
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
        record = json.loads((stage / "train_log.json").read_text())
        record.pop("log", None)
        result = msgspec.convert(record, TrainResult)
    write_stage(stage, spec, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.train SPEC.json`` (also under ``accelerate launch``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m distill.train SPEC.json", file=sys.stderr)
        return 2
    train_kd(msgspec.json.decode(Path(args[0]).read_bytes(), type=TrainSpec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
