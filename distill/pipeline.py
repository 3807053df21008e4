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
from typing import Any, Literal

from distill.config import DistillConfig
from distill.stages import fingerprint

__all__ = ["METRIC_KEYS", "REPORT_KEYS", "STAGES", "Context", "Stage", "log_url", "resolve", "run"]

Stage = Literal["dataset", "label", "student", "train", "export", "eval", "publish"]
STAGES: tuple[Stage, ...] = ("dataset", "label", "student", "train", "export", "eval", "publish")

METRIC_KEYS = (
    "teacher_params",
    "student_params",
    "agreement",
    "rouge_l",
    "teacher_tokens_per_s",
    "student_tokens_per_s",
    "gate_passed",
)
"""The student's summary, stored with it in the registry."""
REPORT_KEYS = ("student_model", *METRIC_KEYS)
"""Keys every ``report.json`` has (``retort distill run``'s contract)."""


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


def log_url(config: DistillConfig) -> str:
    """The prompt log's URL: the config's, else the gateway settings', else SQLite in home."""
    from retort.settings import default_url, load_shared

    if config.promptlog_url:
        return config.promptlog_url
    settings = load_shared(config.settings)
    if settings.promptlog.url:
        return settings.promptlog.url
    return default_url(Path(config.home).expanduser() if config.home else settings.home_path)


def resolve(config: DistillConfig) -> Context:
    """Home, prompt-log URL, teacher base model (provisioned if ``default``) and adapter."""
    from retort.models import DEFAULT_MODEL_NAME, resolve_model
    from retort.settings import load_shared, state_dir

    settings = load_shared(config.settings)
    home = Path(config.home).expanduser() if config.home else settings.home_path
    url = log_url(config)
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
        root = state_dir(settings.adapters.dir, home, "adapters")
        adapter_dir = root / config.adapter
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter {config.adapter!r} in {root}")
    student_name = config.student_name or f"{config.adapter or base_name}-student"
    students_root = state_dir(settings.students.dir, home, "students")
    return Context(
        home, url, base_dir, base_name, config.adapter, adapter_dir, student_name, students_root
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
) -> dict[str, Any]:
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
    stop_at = STAGES.index(until)
    stages: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        _log(progress, f"{name} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        stages[name] = round(time.perf_counter() - t0, 2)
        _log(progress, f"{name} done in {stages[name]:.1f}s")
        return result

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
        wm = ds.watermark(rows)
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
    stages["select"] = round(time.perf_counter() - t0, 2)
    if prev is not None:
        skipped = {
            "skipped": True,
            "reason": "no new data since the last run",
            "previous_run": prev["run_id"],
            "watermark": ds.watermark(rows),
            "student_model": prev.get("student_model"),
        }
        _log(progress, f"no new data since run {prev['run_id']}: nothing to do")
        return skipped
    try:
        report = _stages(config, ctx, out, rows, stop_at, timed, progress)
    except BaseException as exc:
        if run_id is not None:
            error = f"{type(exc).__name__}: {exc}"[:2000]

            async def failed(store: Any) -> None:
                await runs_db.finish_run(store, run_id, status="failed", error=error)

            asyncio.run(_with_store(ctx.url, failed))
        raise
    report["stages"] = {**stages, **report.get("stages", {})}
    report["total_seconds"] = round(time.perf_counter() - t_all, 2)
    report["run_id"] = run_id
    if "agreement" in report:
        from distill.evaluate import write_report

        samples = _samples(out)
        write_report(out, report, samples)
    if run_id is not None:
        summary = {k: report.get(k) for k in (*METRIC_KEYS, "total_seconds")}
        asyncio.run(
            _with_store(
                ctx.url,
                lambda s: runs_db.finish_run(
                    s,
                    run_id,
                    status="succeeded",
                    student_model=report.get("student_model"),
                    gate_passed=report.get("gate_passed"),
                    published=report.get("published"),
                    summary=summary,
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
    """One run's inputs and what its stages have produced so far."""

    config: DistillConfig
    ctx: Context
    out: Path
    rows: list[dict[str, Any]]
    timed: Any
    progress: bool
    report: dict[str, Any]
    done: dict[str, Any] = field(default_factory=dict)
    """Stage name -> its result."""


def _dataset(r: _Run) -> bool:
    from distill.dataset import build_dataset

    data = r.timed("dataset", build_dataset, r.rows, r.out, r.config.dataset)
    r.done["dataset"] = r.report["dataset"] = data
    return True


def _label(r: _Run) -> bool:
    from distill.teacher import teacher_stage

    data = r.done["dataset"]
    teacher = r.timed(
        "label",
        teacher_stage,
        r.ctx.base_dir,
        r.ctx.adapter_dir,
        r.out,
        r.config.teacher,
        served_model=r.ctx.base_name,
        adapter=r.ctx.adapter,
        dataset_models=data["models"],
        dataset_fingerprint=fingerprint(data),
    )
    r.done["label"] = r.report["teacher"] = teacher
    return True


def _student(r: _Run) -> bool:
    from distill.student import student_stage

    teacher = r.done["label"]
    student = r.timed("student", student_stage, Path(teacher["model"]), r.out, r.config.student)
    r.done["student"] = student
    r.report["teacher_params"] = student["teacher_params"]
    r.report["student_params"] = student["student_params"]
    r.report["param_ratio"] = student["student_params"] / student["teacher_params"]
    r.report["student_init"] = student
    return True


def _train(r: _Run) -> bool:
    from distill.train import train_stage

    teacher, student = r.done["label"], r.done["student"]
    trained = r.timed(
        "train",
        train_stage,
        Path(teacher["model"]),
        Path(student["path"]),
        Path(teacher["labels"]),
        r.out,
        r.config.train,
        progress=r.progress,
    )
    r.done["train"] = r.report["train"] = trained
    return True


def _export(r: _Run) -> bool:
    from distill.dataset import load_splits
    from distill.export import export_stage

    teacher, trained = r.done["label"], r.done["train"]
    train_split, eval_split = load_splits(Path(teacher["labels"]))
    r.done["eval_split"] = eval_split
    sample_prompts = [e["messages"] for e in (eval_split + train_split) if e.get("messages")]
    exported = r.timed(
        "export", export_stage, Path(trained["model"]), r.out, r.config.export, sample_prompts
    )
    r.done["export"] = r.report["export"] = exported
    r.report["precision"] = exported["precision"]
    r.report["student_size_bytes"] = exported["size_bytes"]
    r.report["teacher_size_bytes"] = sum(
        p.stat().st_size for p in Path(teacher["model"]).glob("*.safetensors")
    )
    return True


def _eval(r: _Run) -> bool:
    from distill.evaluate import eval_stage, gate

    teacher, trained, exported = r.done["label"], r.done["train"], r.done["export"]
    metrics = r.timed(
        "eval",
        eval_stage,
        Path(exported["onnx"]),
        Path(teacher["model"]),
        r.done["eval_split"],
        r.out,
        r.config.eval,
        fingerprint=fingerprint([trained, exported]),
    )
    report = r.report
    report["eval"] = metrics
    report["agreement"] = metrics["agreement"]
    report["rouge_l"] = metrics["rouge_l"]
    report["student_tokens_per_s"] = metrics["student"]["tokens_per_s"]
    report["student_latency_p50_s"] = metrics["student"]["latency_p50_s"]
    report["student_answer_latency_p50_s"] = metrics["student"]["answer_latency_p50_s"]
    t = metrics.get("teacher")
    report["teacher_tokens_per_s"] = t["tokens_per_s"] if t else None
    report["teacher_latency_p50_s"] = t["latency_p50_s"] if t else None
    report["speedup"] = (
        report["student_tokens_per_s"] / report["teacher_tokens_per_s"]
        if report["teacher_tokens_per_s"]
        else None
    )
    g = gate(report, r.config.gate)
    report["gate"] = g
    report["gate_passed"] = g["passed"]
    report["published"] = False
    return True


def _publish(r: _Run) -> bool:
    if not r.config.publish:
        return False
    report = r.report
    if not report["gate_passed"]:
        _log(r.progress, "gate failed: not publishing")
        return False
    from distill.evaluate import write_report
    from gateway.students import StudentRegistry

    ctx, exported = r.ctx, r.done["export"]
    report["published"] = True
    report["student_path"] = str(ctx.students_root / ctx.student_name)
    write_report(r.out, report, _samples(r.out))
    summary = {k: report.get(k) for k in METRIC_KEYS}
    try:
        r.timed(
            "publish",
            StudentRegistry(ctx.students_root).publish,
            ctx.student_name,
            Path(exported["onnx"]),
            teacher_model=ctx.base_name,
            adapter=ctx.adapter,
            precision=exported["precision"],
            report=summary,
            report_dir=r.out,
        )
    except BaseException:
        report["published"] = False
        report.pop("student_path", None)
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
"""The stages in order; each reads what the ones before it left in ``_Run.done`` and
returns whether the run goes on."""
assert tuple(name for name, _ in _STAGE_TABLE) == STAGES


def _stages(
    config: DistillConfig,
    ctx: Context,
    out: Path,
    rows: list[dict[str, Any]],
    stop_at: int,
    timed: Any,
    progress: bool,
) -> dict[str, Any]:
    """Run the stages up to ``STAGES[stop_at]``; returns the report."""
    report: dict[str, Any] = {
        "student_model": ctx.student_name,
        "teacher_model": ctx.base_name,
        "adapter": ctx.adapter,
        "run_dir": str(out),
    }
    state = _Run(config, ctx, out, rows, timed, progress, report)
    for _, stage in _STAGE_TABLE[: stop_at + 1]:
        if not stage(state):
            break
    return report
