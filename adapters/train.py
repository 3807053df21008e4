"""LoRA SFT with peft on the served base model: ``retort adapters train``.

Reads chat JSONL (``{"messages": [...]}`` per line), learns the assistant turns only,
shows progress, and writes a registry-ready adapter: ``adapter_config.json`` and
``adapter_model.safetensors`` (whose ``base_model_name_or_path`` names the base the way
the registry checks it), ``train_log.json``, ``loss.png`` and ``retort.json``. Everything
is assembled in a hidden staging folder inside the registry root and renamed into place
once validated. Runs on the GPU when torch sees one, else on the CPU in float32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.data import IGNORE_INDEX, DataError, Example, encode_chat, read_chat_jsonl
from adapters.errors import AdapterExistsError
from adapters.manifest import set_adapter_base
from adapters.registry import AdapterRegistry, check_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "TrainConfig",
    "TrainResult",
    "causal_lm_loss",
    "collate",
    "train",
    "train_result",
    "training_progress",
]


@dataclass
class TrainConfig:
    """What to train, on what, and how."""

    data: Path
    """Chat JSONL: one ``{"messages": [{"role", "content"}, ...]}`` per line."""
    name: str
    """Registry name of the adapter (its folder name, and the ``model`` clients send)."""
    base_model: Path
    """Local folder of the base model (config, tokenizer, safetensors weights)."""
    out_root: Path
    """Registry root the adapter is written into."""
    rank: int = 16
    """LoRA rank ``r``; the engine must allow it (``engine.max_lora_rank``)."""
    alpha: int = 32
    """LoRA alpha; updates are scaled by ``alpha / rank``."""
    targets: Sequence[str] = ("q_proj", "v_proj")
    """Base-model modules to adapt (leaf names)."""
    epochs: int = 1
    """Passes over the data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; cycles through the data as often as needed."""
    lr: float = 2e-4
    """AdamW learning rate (constant)."""
    batch_size: int = 8
    """Conversations per step."""
    max_len: int = 256
    """Tokens per conversation; longer ones are truncated."""
    seed: int = 0
    """Seeds adapter initialization and data order."""
    dropout: float = 0.0
    """LoRA dropout."""
    base_model_name: str | None = None
    """``base_model_name_or_path`` written into the adapter config; default: the base
    folder's name, which the registry accepts for that base and its served name."""
    overwrite: bool = False
    """Replace an existing adapter of the same name."""
    device: str | None = None
    """``cuda``, ``cpu``...; default: ``cuda`` when available, else ``cpu``."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""


@dataclass
class TrainResult:
    """What :func:`train_result` returns: where the adapter is and how training went."""

    path: Path
    """The installed adapter folder."""
    losses: list[float]
    """Loss per step."""
    seconds: float
    """Training wall time (loading and saving excluded)."""
    log: dict[str, Any] = field(default_factory=dict)
    """The contents of ``train_log.json``."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; labels equal to ``-100`` are ignored.
    Pure: no model, no state.
    """
    import torch.nn.functional as F  # noqa: N812

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Index batches forever: a fresh shuffle each epoch, the last batch may be short."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def _plot(losses: list[float], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, marker="." if len(losses) < 50 else None, label="loss")
    k = max(1, len(losses) // 10)
    if k > 1:
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, label=f"mean of {k}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def train(config: TrainConfig, progress: bool = True) -> Path:
    """Train a LoRA adapter and install it in ``config.out_root``; return its folder.

    Raises:
        DataError: the data is malformed; AdapterExistsError: the name is taken;
        AdapterValidationError: the result does not validate (nothing is installed).
    """
    return train_result(config, progress=progress).path


def train_result(config: TrainConfig, progress: bool = True) -> TrainResult:
    """:func:`train`, also returning the losses and timings."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"adapter training needs torch, transformers and peft ({exc.name} is missing): "
            "pip install 'retort-gateway[cpu]' (or [gpu])"
        ) from exc

    check_name(config.name)
    base_path = Path(config.base_model).expanduser()
    base_name = config.base_model_name or base_path.name
    registry = AdapterRegistry(
        config.out_root,
        base_model_name=base_name,
        base_model_path=base_path,
        max_lora_rank=config.rank,
    )
    if (registry.root / config.name).exists() and not config.overwrite:
        raise AdapterExistsError(
            f"adapter {config.name!r} already exists in {registry.root} (use overwrite)"
        )

    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    conversations = read_chat_jsonl(config.data)
    encoded = [encode_chat(tokenizer, c, config.max_len) for c in conversations]
    examples = [e for e in encoded if any(x != IGNORE_INDEX for x in e.labels)]
    if not examples:
        raise DataError(f"{config.data}: no assistant tokens within max_len={config.max_len}")

    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.bfloat16 if use_bf16 else torch.float32
    )
    model: Any = get_peft_model(
        base,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.targets),
            lora_dropout=config.dropout,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    per_epoch = math.ceil(len(examples) / config.batch_size)
    total = config.max_steps if config.max_steps is not None else config.epochs * per_epoch
    if total <= 0:
        raise DataError("nothing to train: max_steps/epochs give 0 steps")
    steps_log: list[dict[str, float]] = []
    losses: list[float] = []
    batches = _batches(len(examples), config.batch_size, config.seed)
    bar = training_progress(progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task(f"training {config.name}", total=total, loss=float("nan"))
        for step in range(1, total + 1):
            batch = {
                k: v.to(device)
                for k, v in collate([examples[i] for i in next(batches)], pad_id).items()
            }
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            loss = causal_lm_loss(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            steps_log.append(
                {"step": step, "loss": value, "seconds": round(time.perf_counter() - t0, 3)}
            )
            bar.update(task, advance=1, loss=value)
    seconds = time.perf_counter() - t0

    log: dict[str, Any] = {
        "name": config.name,
        "base_model": base_name,
        "config": {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(config).items()
        },
        "device": str(device),
        "examples": len(examples),
        "dropped_examples": len(encoded) - len(examples),
        "assistant_tokens": sum(sum(x != IGNORE_INDEX for x in e.labels) for e in examples),
        "trainable_parameters": sum(p.numel() for p in params),
        "steps": steps_log,
        "train_seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / total, 4),
        "initial_loss": losses[0],
        "final_loss": losses[-1],
    }
    metrics = {
        "final_loss": losses[-1],
        "initial_loss": losses[0],
        "steps": float(total),
        "train_seconds": round(seconds, 3),
    }
    with registry.staging(config.name) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        set_adapter_base(tmp, base_name)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
        _plot(losses, tmp / "loss.png", f"{config.name} on {base_name}")
        registry.install(
            tmp, config.name, source="trained", metrics=metrics, overwrite=config.overwrite
        )
    return TrainResult(registry.root / config.name, losses, seconds, log)


def training_progress(enabled: bool, *, console: Any = None, every_s: float = 30.0) -> Any:
    """The progress training shows (step M/N, loss, times); shared with distill. On a
    terminal, rich's live bar; in a log (a Job, ``nohup``, CI), where rich draws nothing
    until the end, a plain line every ``every_s`` seconds and at the last step."""
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Progress(Progress):
        def update(self, task_id: TaskID, **kwargs: Any) -> None:
            super().update(task_id, **kwargs)
            if self.disable or self.console.is_terminal:
                return
            task = next(t for t in self.tasks if t.id == task_id)
            now = time.monotonic()
            if now - self._plain_at < every_s and not task.finished:
                return
            self._plain_at = now
            left = task.time_remaining
            self.console.print(
                f"{task.description}: step {task.completed:.0f}/{task.total or 0:.0f}, "
                f"loss {task.fields.get('loss', float('nan')):.4f}, "
                f"{task.elapsed or 0:.0f} s"
                + (f", about {left:.0f} s left" if left is not None and not task.finished else ""),
                highlight=False,
                soft_wrap=True,
            )

        _plain_at = float("-inf")

    return _Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        console=console,
    )
