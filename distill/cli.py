"""``retort distill``: run the pipeline, or any stage of it, and list past runs.

Every stage command takes the same options as ``run`` and runs the stages it needs first
(those already done in ``--out`` are skipped). Only ``run`` records itself in the
``distill_runs`` table and skips when the log has no new data.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from distill.results import Summary

__all__ = ["distill_app", "start_rollout_for"]

distill_app = typer.Typer(
    help="Distill students from the prompt log: run, or one stage; list runs.",
    no_args_is_help=True,
)

AdapterOpt = Annotated[str | None, typer.Option("--adapter", "-a", help="The teacher's adapter.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run folder (resumable).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="distill.yaml.")]
LayersOpt = Annotated[int | None, typer.Option("--student-layers", help="Student layers.")]
StepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Training steps.")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="int4, int8 or fp32.")]
PublishOpt = Annotated[bool, typer.Option("--publish", help="Publish if the gate passes.")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Prompt-log database URL.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="RETORT_HOME.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even without new data.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
RolloutOpt = Annotated[
    bool,
    typer.Option("--rollout", help="With --publish: start a staged rollout of it, in shadow."),
]


def _config(
    config: Path | None,
    adapter: str | None,
    layers: int | None,
    steps: int | None,
    precision: str | None,
    publish: bool,
    url: str | None,
    home: Path | None,
) -> Any:
    from distill.config import DistillConfigError, load_config

    overrides: dict[str, Any] = {}
    if adapter is not None:
        overrides["adapter"] = adapter
    if layers is not None:
        overrides["student"] = {"layers": layers}
    if steps is not None:
        overrides["train"] = {"max_steps": steps}
    if precision is not None:
        overrides["export"] = {"precision": precision}
    if publish:
        overrides["publish"] = True
    if url is not None:
        overrides["promptlog_url"] = url
    if home is not None:
        overrides["home"] = str(home)
    try:
        return load_config(config, overrides)
    except DistillConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _run(
    until: str, out: Path, cfg: Any, *, quiet: bool, force: bool = False, record: bool = False
) -> Any:
    from distill.dataset import DatasetError
    from distill.pipeline import run

    if quiet:
        _silence()
    try:
        return run(cfg, out, until=until, progress=not quiet, force=force, record=record)  # type: ignore[arg-type]
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _silence() -> None:
    """No library progress bars (datasets, transformers) on stdout/stderr."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _summary(report: Any) -> str:
    from distill.results import summary

    return json.dumps(summary(report), indent=2)


def _stage_command(stage: str, doc: str) -> None:
    def command(
        out: OutOpt,
        adapter: AdapterOpt = None,
        config: ConfigOpt = None,
        student_layers: LayersOpt = None,
        max_steps: StepsOpt = None,
        precision: PrecisionOpt = None,
        url: UrlOpt = None,
        home: HomeOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        cfg = _config(
            config, adapter, student_layers, max_steps, precision, stage == "publish", url, home
        )
        report = _run(stage, out, cfg, quiet=quiet)
        if stage in ("eval", "publish"):
            typer.echo(_summary(report))
        else:
            import msgspec

            result = getattr(report, _RESULT_KEY[stage])
            typer.echo(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())

    command.__doc__ = doc
    distill_app.command(stage)(command)


_RESULT_KEY = {
    "dataset": "dataset",
    "label": "teacher",
    "train": "train",
    "export": "export",
    "eval": "eval",
}


@distill_app.command("run")
def run_command(
    out: OutOpt,
    adapter: AdapterOpt = None,
    config: ConfigOpt = None,
    student_layers: LayersOpt = None,
    max_steps: StepsOpt = None,
    precision: PrecisionOpt = None,
    publish: PublishOpt = False,
    url: UrlOpt = None,
    home: HomeOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    rollout: RolloutOpt = False,
) -> None:
    """Run the whole pipeline into OUT; writes OUT/report.json (and .md, .png)."""
    if rollout and not publish:
        raise typer.BadParameter("--rollout needs --publish")
    cfg = _config(config, adapter, student_layers, max_steps, precision, publish, url, home)
    report = _run("publish", out, cfg, quiet=quiet, force=force, record=True)
    from distill.results import Skipped

    if isinstance(report, Skipped):
        typer.echo(f"no new data since run {report.previous_run}: nothing to do")
        return
    typer.echo(_summary(report))
    if rollout and report.published:
        typer.echo(start_rollout_for(cfg, report, out))


def start_rollout_for(cfg: Any, report: Summary, out: Path) -> str:
    """The gateways' rollout evaluator takes it from here (see README: Staged rollout)."""
    from distill.pipeline import log_url
    from retort.db.rollouts import start_rollout
    from retort.rollout import steps_from
    from retort.settings import load_shared

    teacher = report.adapter or report.teacher_model
    if teacher is None:
        return "no rollout started: the report names no teacher"
    steps = steps_from(load_shared(cfg.settings).rollout)
    reason = f"published by retort distill run --out {out}"
    r = asyncio.run(
        start_rollout(log_url(cfg), teacher, report.student_model, steps, reason=reason)
    )
    return f"rollout started: {r.teacher} -> {r.student} in {r.stage}"


_stage_command("dataset", "Select, deduplicate and split logged requests into OUT/dataset.")
_stage_command("label", "Merge the teacher; keep logged completions or relabel with vLLM.")
_stage_command("train", "Initialize the student and train it by KD (OUT/train/final).")
_stage_command("export", "Export the trained student to ONNX (OUT/export/onnx).")
_stage_command("eval", "Evaluate the student against the teacher; writes OUT/report.*.")
_stage_command("publish", "Gate and publish the student into the students registry.")


@distill_app.command("runs")
def runs_command(
    adapter: AdapterOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    url: UrlOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List distillation runs (the distill_runs table)."""
    from distill.pipeline import log_url
    from distill.runs import list_runs
    from retort.db.store import PromptStore

    cfg = _config(config, None, None, None, None, False, url, home)

    async def fetch() -> list[dict[str, Any]]:
        async with PromptStore(log_url(cfg)) as store:
            return await list_runs(store, adapter=adapter, limit=limit)

    rows = asyncio.run(fetch())
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("run", "adapter", "status", "started", "rows", "student", "gate", "published")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
        table.add_row(
            r["run_id"],
            r["adapter"] or "-",
            r["status"],
            started,
            str(r["watermark_count"]),
            r["student_model"] or "-",
            str(r["gate_passed"]),
            str(r["published"]),
        )
    Console().print(table)
