"""Typed configuration of a distillation run (msgspec Structs, loadable from YAML).

``distill.yaml`` mirrors :class:`DistillConfig`; every field has a default, so a file only
names what it changes::

    adapter: support-bot
    dataset: {since: 7d, min_score: 0.5}
    student: {layers: 5}
    train: {max_steps: 150, loss: kl, temperature: 2.0}
    export: {precision: int4}
    gate: {min_agreement: 0.9}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = [
    "DatasetConfig",
    "DistillConfig",
    "DistillConfigError",
    "EarlyStopConfig",
    "EvalConfig",
    "ExportConfig",
    "GateConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "load_config",
]


class DistillConfigError(ValueError):
    """The distillation config is invalid."""


class _Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class DatasetConfig(_Base):
    """Which logged requests become training data, and how they are cleaned and split."""

    model: str | None = None
    """Served model name to select (default: any)."""
    since: str | None = None
    """From (inclusive): unix seconds, ISO 8601, or an age like ``7d``."""
    until: str | None = None
    """Until (exclusive), same forms."""
    min_score: float | None = None
    """Keep only requests whose mean feedback score is at least this."""
    drop_below: float | None = None
    """Drop requests rated below this mean feedback score (unrated ones are kept)."""
    use_corrections: bool = True
    """A reviewer's correction (``/v1/feedback``'s ``correction``, the latest one) replaces
    the logged answer as the training target."""
    served_by: str = "engine"
    """``engine`` (the teacher: base model + adapter) or ``student``."""
    status: str = "ok"
    limit: int | None = None
    """At most this many records (the oldest first)."""
    near_dup_threshold: float = 0.9
    """Jaccard similarity of prompt shingles at or above which two prompts are duplicates."""
    shingle_size: int = 3
    """Words per shingle for near-duplicate detection."""
    eval_fraction: float = 0.1
    """Share of prompts (by prompt hash) held out for eval."""
    max_eval: int | None = 100
    """Cap on the eval split (the rest of the held-out prompts are dropped)."""
    min_examples: int = 8
    """Fewer selected examples than this is an error."""


class TeacherConfig(_Base):
    """The teacher: the served base model with the adapter merged in."""

    base_model: str | None = None
    """Base model folder; default the gateway's ``model.path`` (``default`` is provisioned)."""
    base_model_name: str | None = None
    """The base model's served name (what the log's ``model`` holds); default its folder name."""
    relabel: bool | None = None
    """Regenerate completions with vLLM offline batch generation. ``None``: only when the
    logged completions came from another model than the teacher."""
    max_tokens: int = 128
    """Completion budget when relabelling and measuring speed."""


class StudentConfig(_Base):
    """The student's initial weights."""

    layers: int = 5
    """Take this many of the teacher's layers, evenly spaced (first and last included). The
    default is the frontier's best recipe (BENCHMARKS section 6c): 5 of SmolLM2-135M's 30,
    0.342x its parameters, agreed on 50 of 50 held-out sentiment prompts; a task that needs
    more (long structured answers) sets 10 or more."""
    source: str | None = None
    """Instead, any model folder whose vocabulary matches the teacher's."""
    intermediate_size: int | None = None
    """Width pruning (:mod:`distill.prune`, Minitron-style): keep this many MLP channels per
    layer, the most active on calibration examples (``None``: all)."""
    hidden_size: int | None = None
    """Width pruning: keep this many embedding channels, the most active (``None``: all)."""
    calibration_examples: int = 64
    """Train examples (prompt and the teacher's answer) that rank the channels."""


class EarlyStopConfig(_Base):
    """Stop training when held-out agreement stops improving."""

    every: int = 0
    """Evaluate every this many steps (0: off, train ``max_steps``)."""
    examples: int = 16
    """Prompts of the train split held out of training and answered at each evaluation."""
    patience: int = 2
    """Stop after this many evaluations in a row without a rise (at agreement 1 too)."""
    min_steps: int = 30
    """Never stop before this step: a small student spends its first tens of steps in
    warm-up, answering one label for everything, and a flat history there means nothing."""
    min_delta: float = 0.0
    """An improvement is a rise of more than this."""
    max_tokens: int = 32
    """Answer budget at each evaluation."""


class TrainConfig(_Base):
    """Token-level KD on the teacher's logits, mixed with CE on its completions."""

    max_steps: int = 150
    batch_size: int = 8
    """Examples per optimizer step, across processes and accumulation."""
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    loss: Literal["kl", "jsd"] = "kl"
    """``kl``: forward KL at ``temperature``; ``jsd``: GKD's generalized JSD(``beta``)."""
    alpha: float = 0.5
    """Weight of the KD term; ``1 - alpha`` weighs the CE term."""
    temperature: float = 1.0
    beta: float = 0.5
    max_len: int = 256
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    seed: int = 0
    max_grad_norm: float = 1.0
    num_processes: int = 1
    """> 1: run the trainer under ``accelerate launch --num_processes N`` (``--cpu`` when
    no GPU)."""
    early_stop: EarlyStopConfig = msgspec.field(default_factory=EarlyStopConfig)
    teacher_cache_mb: int = 2048
    """Keep the teacher's logits at each example's completion tokens after its first
    forward (the teacher is frozen), up to this many MB, so later epochs skip the
    teacher's forward pass (0: off)."""


class ExportConfig(_Base):
    precision: Literal["fp32", "int8", "int4"] = "int4"
    parity_prompts: int = 4
    """Sample prompts on which greedy tokens of ONNX and torch are compared."""
    parity_tokens: int = 16
    output_vocab: Literal["full", "trimmed"] = "full"
    """``trimmed``: the exported LM head keeps only the tokens of the teacher's train-split
    answers, the special and end tokens, and ``output_vocab_extra`` more (:mod:`distill.vocab`);
    the student can then produce no other token. Training stays full-vocabulary."""
    output_vocab_extra: int = 2048
    """``trimmed``: also keep token ids ``0 .. N-1`` (in a byte-level BPE tokenizer the single
    bytes and the most frequent merges, so any text stays spellable)."""


class EvalConfig(_Base):
    max_examples: int = 50
    """Held-out prompts to evaluate (the first of the eval split)."""
    max_tokens: int = 64
    teacher_speed: Literal["vllm", "transformers", "skip"] = "vllm"
    """How to measure the teacher's single-stream tokens/s on this machine."""
    speed_prompts: int = 4
    """Prompts for the tokens/s and latency measurements: student and teacher alike generate
    exactly ``max_tokens`` on each, one at a time."""
    teacher_url: str | None = None
    """A running gateway (``http://host:port``) serving the teacher: its speed is measured
    there (``teacher_speed: vllm``) instead of on an engine started for it."""
    teacher_api_key: str | None = None
    """The gateway's API key, when it asks for one."""
    measure: Literal["auto", "exact", "json", "open"] = "auto"
    """How agreement is measured: ``auto`` chooses from the logged answers (``exact`` for
    label-like ones, ``json`` for JSON ones, ``open`` otherwise)."""
    short_words: int = 8
    """``auto``: answers of at most this many words are short."""
    label_max_distinct: float = 0.1
    """``auto``: short answers are label-like when the distinct ones are at most this share
    of them (labels repeat; short free answers do not)."""
    min_likelihood: float = 0.5
    """``open``: a pair agrees when the teacher finds the student's answer at least this
    likely, per token, as its own answer (geometric mean of token probabilities)."""


class GateConfig(_Base):
    """Thresholds the student must meet to be published (``None`` disables one)."""

    min_agreement: float | None = 0.5
    min_rouge_l: float | None = 0.5
    min_speedup: float | None = 1.0
    """Student tok/s over teacher tok/s."""
    max_param_ratio: float | None = 0.75
    """Student params over teacher params."""


class DistillConfig(_Base):
    """A whole run: ``retort distill run``."""

    adapter: str | None = None
    """The teacher's adapter (registry name); ``None`` distills the base model."""
    student_name: str | None = None
    """Registry name of the student; default ``<adapter>-student`` (or ``<base>-student``)."""
    home: str | None = None
    """``RETORT_HOME``; default the gateway settings' home."""
    promptlog_url: str | None = None
    """Prompt-log database URL; default the gateway's (SQLite ``retort.db`` in home)."""
    settings: str | None = None
    """A gateway YAML config (``retort.yaml``) to take home, model and the log URL from."""
    publish: bool = False
    dataset: DatasetConfig = msgspec.field(default_factory=DatasetConfig)
    teacher: TeacherConfig = msgspec.field(default_factory=TeacherConfig)
    student: StudentConfig = msgspec.field(default_factory=StudentConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    export: ExportConfig = msgspec.field(default_factory=ExportConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    gate: GateConfig = msgspec.field(default_factory=GateConfig)


def load_config(
    path: Path | str | None = None, overrides: dict[str, Any] | None = None
) -> DistillConfig:
    """The config from YAML ``path`` (or defaults), with ``overrides`` (nested dicts) on top."""
    from retort.settings import SettingsError, read_yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = read_yaml(path)
        except SettingsError as exc:
            raise DistillConfigError(str(exc)) from exc
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            section = data.setdefault(key, {})
            if not isinstance(section, dict):
                raise DistillConfigError(f"{key} must be a mapping")
            section.update(value)
        else:
            data[key] = value
    try:
        return msgspec.convert(data, DistillConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise DistillConfigError(f"invalid distill config: {exc}") from exc
