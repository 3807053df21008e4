"""The whole pipeline: dataset -> label -> student -> train -> export -> eval -> publish.

:func:`run` runs the stages up to ``until`` into a run folder; each stage is skipped when
its outputs exist for the same inputs, so a rerun after a failure resumes where it
stopped, and a stage command (``retort distill train``) runs what it needs before it.
A full run (``retort distill run``) is recorded in the ``distill_runs`` table and keyed by
a watermark over the log: when the selection matches exactly what the last succeeded run
of the same key saw, nothing runs (``{"skipped": true, ...}``).

Past ~400 lines on purpose: the stages are a table (:data:`_STAGE_TABLE`) of one short
function each, read top to bottom in the order they run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from distill.config import DistillConfig
from distill.results import (
    DatasetResult,
    ExportResult,
    MeasureChoice,
    Report,
    Skipped,
    StudentInit,
    TeacherResult,
    TrainResult,
    summary,
)
from distill.stages import fingerprint

if TYPE_CHECKING:
    from retort.settings import SharedSettings

_R = TypeVar("_R")

__all__ = ["STAGES", "Context", "Stage", "log_url", "resolve", "run"]

Stage = Literal["dataset", "label", "student", "train", "export", "eval", "publish"]
STAGES: tuple[Stage, ...] = ("dataset", "label", "student", "train", "export", "eval", "publish")


@dataclass(frozen=True)
class Context:
    """Where things are, resolved from the distill config and the gateway settings."""

    home: Path
    url: str
    base_dir: Path
    base_name: str
    adapter: str | None
    adapter_dir: Path | None
    student_name: str
    students_root: Path


def _settings(config: DistillConfig) -> SharedSettings:
    """The gateway's shared settings (its file, ``RETORT_*``), with the config's home."""
    from retort.settings import SharedSettings, load

    overrides = {"home": config.home} if config.home else None
    return load(SharedSettings, config.settings, overrides=overrides)


def log_url(config: DistillConfig) -> str:
    """The prompt log's URL: the config's, else the gateway settings' (SQLite in home)."""
    return config.promptlog_url or _settings(config).promptlog_url


def resolve(config: DistillConfig) -> Context:
    """Home, prompt-log URL, teacher base model (provisioned if ``default``) and adapter."""
    from retort.models import DEFAULT_MODEL_NAME, resolve_model

    settings = _settings(config)
    home = settings.home_path
    model_path = config.teacher.base_model or settings.model.path
    base_dir = Path(resolve_model(model_path, home))
    if config.teacher.base_model_name:
        base_name = config.teacher.base_model_name
    elif settings.model.served_name and not config.teacher.base_model:
        base_name = settings.model.served_name
    elif model_path == "default":
        base_name = DEFAULT_MODEL_NAME
    else:
        base_name = base_dir.name
    adapter_dir = None
    if config.adapter:
        adapter_dir = settings.adapters_path / config.adapter
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter {config.adapter!r} in {settings.adapters_path}")
    student_name = config.student_name or f"{config.adapter or base_name}-student"
    return Context(
        home,
        config.promptlog_url or settings.promptlog_url,
        base_dir,
        base_name,
        config.adapter,
        adapter_dir,
        student_name,
        settings.students_path,
    )


async def _with_store(url: str, fn: Any) -> Any:
    from retort.db.store import PromptStore

    async with PromptStore(url) as store:
        return await fn(store)


def _log(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]distill[/] {message}")


def run(
    config: DistillConfig,
    out: Path,
    *,
    until: Stage = "publish",
    progress: bool = True,
    force: bool = False,
    record: bool | None = None,
) -> Report | Skipped:
    """Run the pipeline into ``out`` up to ``until``; returns the report (or the skip).

    ``record`` (default: when running to the end) writes the run into ``distill_runs``
    and skips it when the log has no new data since the last succeeded run (unless
    ``force``).
    """
    from distill import dataset as ds
    from distill import runs as runs_db

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = resolve(config)
    record = until == "publish" if record is None else record
    t_all = time.perf_counter()
    key = runs_db.run_key(
        ctx.adapter,
        {
            "model": config.dataset.model,
            "since": config.dataset.since,
            "until": config.dataset.until,
            "min_score": config.dataset.min_score,
            "status": config.dataset.status,
            "served_by": config.dataset.served_by,
            "student": ctx.student_name,
        },
    )

    async def select(store: Any) -> tuple[list[dict[str, Any]], Any, str | None]:
        rows = await ds.select_rows(store, config.dataset, ctx.adapter)
        wm = msgspec.to_builtins(ds.watermark(rows))
        prev = None
        if record and not force:
            prev = await runs_db.previous_at_watermark(store, key, wm)
        if prev is not None:
            return rows, prev, None
        run_id = None
        if record:
            run_id = await runs_db.start_run(
                store,
                key=key,
                adapter=ctx.adapter,
                model=ctx.base_name,
                watermark=wm,
                out_dir=str(out),
            )
        return rows, None, run_id

    t0 = time.perf_counter()
    rows, prev, run_id = asyncio.run(_with_store(ctx.url, select))
    report = Report(
        student_model=ctx.student_name,
        teacher_model=ctx.base_name,
        adapter=ctx.adapter,
        run_dir=str(out),
        run_id=run_id,
        stages={"select": round(time.perf_counter() - t0, 2)},
    )
    if prev is not None:
        _log(progress, f"no new data since run {prev['run_id']}: nothing to do")
        return Skipped(
            previous_run=prev["run_id"],
            watermark=ds.watermark(rows),
            student_model=prev.get("student_model"),
        )
    state = _Run(config, ctx, out, rows, progress, report)
    try:
        for name, stage in _STAGE_TABLE[: STAGES.index(until) + 1]:
            if not state.timed(name, stage):
                break
    except BaseException as exc:
        if run_id is not None:
            error = f"{type(exc).__name__}: {exc}"[:2000]

            async def failed(store: Any) -> None:
                await runs_db.finish_run(store, run_id, status="failed", error=error)

            asyncio.run(_with_store(ctx.url, failed))
        raise
    report.total_seconds = round(time.perf_counter() - t_all, 2)
    if report.eval is not None:
        from distill.report import write_report

        write_report(out, report, _samples(out))
    if run_id is not None:
        asyncio.run(
            _with_store(
                ctx.url,
                lambda s: runs_db.finish_run(
                    s,
                    run_id,
                    status="succeeded",
                    student_model=report.student_model,
                    gate_passed=report.gate_passed,
                    published=report.published,
                    summary=summary(report),
                ),
            )
        )
    return report


def _samples(out: Path) -> list[dict[str, Any]]:
    path = out / "eval" / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class _Run:
    """One run's inputs, the report it fills, and what its stages have produced so far."""

    config: DistillConfig
    ctx: Context
    out: Path
    rows: list[dict[str, Any]]
    progress: bool
    report: Report
    eval_split: list[dict[str, Any]] = field(default_factory=list)
    measure: MeasureChoice | None = None

    def timed(self, name: str, stage: Callable[[_Run], bool]) -> bool:
        """Run one stage, its seconds into the report's ``stages``."""
        _log(self.progress, f"{name} ...")
        t0 = time.perf_counter()
        go_on = stage(self)
        if go_on:
            self.report.stages[name] = seconds = round(time.perf_counter() - t0, 2)
            _log(self.progress, f"{name} done in {seconds:.1f}s")
        return go_on

    @property
    def dataset(self) -> DatasetResult:
        return _done(self.report.dataset, "dataset")

    @property
    def teacher(self) -> TeacherResult:
        return _done(self.report.teacher, "label")

    @property
    def student(self) -> StudentInit:
        return _done(self.report.student_init, "student")

    @property
    def trained(self) -> TrainResult:
        return _done(self.report.train, "train")

    @property
    def exported(self) -> ExportResult:
        return _done(self.report.export, "export")

    def choose_measure(self) -> MeasureChoice:
        """The gate's measure, from the teacher's answers in the train split."""
        if self.measure is None:
            from distill.dataset import load_splits
            from distill.measure import choose_measure

            train, _ = load_splits(Path(self.teacher.labels))
            self.measure = choose_measure([e["completion"] for e in train], self.config.eval)
        return self.measure


def _done(result: _R | None, stage: str) -> _R:
    if result is None:  # the table runs stages in order: a bug, not bad input
        raise RuntimeError(f"stage {stage!r} has not run")
    return result


def _dataset(r: _Run) -> bool:
    from distill.dataset import build_dataset

    r.report.dataset = build_dataset(r.rows, r.out, r.config.dataset)
    return True


def _label(r: _Run) -> bool:
    from distill.teacher import teacher_stage

    timing = r.config.eval
    timed_here = timing.teacher_speed == "vllm" and not timing.teacher_url
    r.report.teacher = teacher_stage(
        r.ctx.base_dir,
        r.ctx.adapter_dir,
        r.out,
        r.config.teacher,
        served_model=r.ctx.base_name,
        adapter=r.ctx.adapter,
        dataset_models=r.dataset.models,
        dataset_fingerprint=fingerprint(r.dataset),
        speed=timing if timed_here else None,
    )
    return True


def _student(r: _Run) -> bool:
    from distill.dataset import load_splits
    from distill.student import student_stage

    cfg = r.config.student
    calibration: list[dict[str, Any]] = []
    if cfg.intermediate_size is not None or cfg.hidden_size is not None:
        calibration = load_splits(Path(r.teacher.labels))[0]
    student = student_stage(
        Path(r.teacher.model),
        r.out,
        cfg,
        calibration,
        calibration_fingerprint=fingerprint(r.teacher),
    )
    r.report.student_init = student
    r.report.teacher_params = student.teacher_params
    r.report.student_params = student.student_params
    r.report.param_ratio = student.student_params / student.teacher_params
    return True


def _train(r: _Run) -> bool:
    from distill.train import train_stage

    r.report.train = train_stage(
        Path(r.teacher.model),
        Path(r.student.path),
        Path(r.teacher.labels),
        r.out,
        r.config.train,
        measure=r.choose_measure().measure,
        progress=r.progress,
    )
    return True


def _export(r: _Run) -> bool:
    from distill.dataset import load_splits
    from distill.export import export_stage

    train_split, r.eval_split = load_splits(Path(r.teacher.labels))
    sample_prompts = [e["messages"] for e in (r.eval_split + train_split) if e.get("messages")]
    exported = export_stage(
        Path(r.trained.model),
        r.out,
        r.config.export,
        sample_prompts,
        train_split,
        train_fingerprint=fingerprint(r.teacher),
    )
    report = r.report
    report.export = exported
    report.precision = exported.precision
    report.student_size_bytes = exported.size_bytes
    report.teacher_size_bytes = sum(
        p.stat().st_size for p in Path(r.teacher.model).glob("*.safetensors")
    )
    return True


def _eval(r: _Run) -> bool:
    from distill.evaluate import eval_stage, gate

    teacher = r.teacher
    metrics = eval_stage(
        Path(r.exported.onnx),
        Path(teacher.model),
        r.eval_split,
        r.out,
        r.config.eval,
        fingerprint=fingerprint([r.trained, r.exported, teacher.speed]),
        measure=r.choose_measure(),
        teacher_timed=teacher.speed,
        served_model=r.ctx.adapter or r.ctx.base_name,
    )
    report = r.report
    report.eval = metrics
    report.measure = metrics.measure.measure
    report.agreement = metrics.agreement
    report.exact_agreement = metrics.exact_agreement
    report.rouge_l = metrics.rouge_l
    report.teacher_likelihood = metrics.teacher_likelihood
    report.json_valid = metrics.json_valid
    report.student_tokens_per_s = metrics.student.tokens_per_s
    report.student_latency_p50_s = metrics.student.latency_p50_s
    report.student_answer_latency_p50_s = metrics.student.answer_latency_p50_s
    t = metrics.teacher
    report.teacher_tokens_per_s = t.tokens_per_s if t else None
    report.teacher_latency_p50_s = t.latency_p50_s if t else None
    report.speedup = (
        report.student_tokens_per_s / report.teacher_tokens_per_s
        if report.teacher_tokens_per_s
        else None
    )
    report.gate = gate(report, r.config.gate)
    report.gate_passed = report.gate.passed
    report.published = False
    return True


def _publish(r: _Run) -> bool:
    if not r.config.publish:
        return False
    report = r.report
    if not report.gate_passed:
        _log(r.progress, "gate failed: not publishing")
        return False
    from distill.report import write_report
    from gateway.students import StudentRegistry

    ctx, exported = r.ctx, r.exported
    report.published = True
    report.student_path = str(ctx.students_root / ctx.student_name)
    write_report(r.out, report, _samples(r.out))
    try:
        StudentRegistry(ctx.students_root).publish(
            ctx.student_name,
            Path(exported.onnx),
            teacher_model=ctx.base_name,
            adapter=ctx.adapter,
            precision=exported.precision,
            report=summary(report),
            report_dir=r.out,
        )
    except BaseException:
        report.published = False
        report.student_path = None
        raise
    return True


_STAGE_TABLE: tuple[tuple[Stage, Callable[[_Run], bool]], ...] = (
    ("dataset", _dataset),
    ("label", _label),
    ("student", _student),
    ("train", _train),
    ("export", _export),
    ("eval", _eval),
    ("publish", _publish),
)
"""The stages in order; each reads what the ones before it left in the report and returns
whether the run goes on."""
assert tuple(name for name, _ in _STAGE_TABLE) == STAGES
