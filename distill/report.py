"""``report.json``, ``report.md`` and ``report.png`` of a run (each written atomically).

``report.md`` tabulates the :class:`~distill.results.Summary` fields (the one list of report
keys), the measure and why it was chosen, the gate's checks, the stages' seconds, the
disagreeing pairs side by side and a few samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from distill.results import Report, Summary

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["write_report"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(text: str, limit: int = 160) -> str:
    one = " ".join(text.split()).replace("|", "\\|")
    return one if len(one) <= limit else one[: limit - 1] + "…"


def _markdown(report: Report, samples: Sequence[dict[str, Any]]) -> str:
    lines = [f"# Distillation report: {report.student_model}", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(getattr(report, k))} |" for k in Summary.__struct_fields__]
    ev = report.eval
    if ev is not None:
        lines += ["", "## Measure", "", f"**{ev.measure.measure}** ({ev.measure.chosen_by}): "]
        lines[-1] += ev.measure.reason + "."
    if report.gate is not None and report.gate.checks:
        lines += [
            "",
            "## Gate",
            "",
            "| check | value | threshold | passed |",
            "| --- | --- | --- | --- |",
        ]
        for name, c in report.gate.checks.items():
            lines.append(f"| {name} | {_fmt(c.value)} | {_fmt(c.threshold)} | {c.passed} |")
    if report.train is not None and report.train.early_stop is not None:
        es = report.train.early_stop
        stop = f"stopped at step {es.stopped_at}" if es.stopped_at else "ran every step"
        lines += [
            "",
            "## Early stop",
            "",
            f"Held-out agreement every {es.every} steps on {es.examples} prompts: "
            + ", ".join(f"{s}: {a:.3g}" for s, a in es.history)
            + f"; best at step {es.best_step} ({es.best_agreement:.3g}), {stop}.",
        ]
    if report.stages:
        lines += ["", "## Stage seconds", "", "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report.stages.items()]
    if ev is not None and ev.disagreements:
        lines += [
            "",
            f"## Disagreeing pairs ({ev.examples - round(ev.agreement * ev.examples)} of "
            f"{ev.examples}; the first {len(ev.disagreements)})",
            "",
            "| prompt | teacher | student | score |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(d.prompt)} | {_cell(d.teacher)} | {_cell(d.student)} | {_fmt(d.score)} |"
            for d in ev.disagreements
        ]
    lines += _cost_lines(report) + _disagreement_lines(report)
    if samples:
        lines += ["", "## Samples", ""]
        for s in samples[:5]:
            lines += [
                f"- **prompt**: {s['prompt']}",
                f"  - teacher: {s['teacher']}",
                f"  - student: {s['student']}",
            ]
    return "\n".join(lines) + "\n"


def _cost_lines(report: Report) -> list[str]:
    """The teacher's measured cost per 1k tokens, the student's projected from the measured
    speedup (on the same instance a token costs its time), and the saving."""
    teacher_cost = report.dataset.teacher_usd_per_1k_tokens if report.dataset else None
    if not teacher_cost:
        return []
    student_cost = teacher_cost / report.speedup if report.speedup else None
    lines = [
        "",
        "## Cost per 1k tokens",
        "",
        "| | USD per 1k tokens |",
        "| --- | --- |",
        f"| teacher (measured: the prompt log's costs) | {teacher_cost:.6g} |",
        "| student (projected from the measured speedup) | "
        + (f"{student_cost:.6g} |" if student_cost is not None else "- |"),
    ]
    if student_cost is not None:
        lines.append(
            "| projected saving at the current split (shadow: 0) / at full | "
            f"0% / {100 * (1 - student_cost / teacher_cost):.1f}% |"
        )
    return lines


def _disagreement_lines(report: Report) -> list[str]:
    """Shadow disagreements on rated requests (what reviewers and students said of them)."""
    pairs = report.dataset.feedback.shadow_disagreements if report.dataset else []
    if not pairs:
        return []
    return [
        "",
        "## Shadow disagreements on rated requests",
        "",
        "| request | feedback score | student | measure | shadow score |",
        "| --- | --- | --- | --- | --- |",
    ] + [
        f"| {d.request_id} | {_fmt(d.feedback_score)} | {d.student} | {d.measure} | "
        f"{_fmt(d.shadow_score)} |"
        for d in pairs
    ]


def write_report(out: Path, report: Report, samples: Sequence[dict[str, Any]] = ()) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)

    def atomic(name: str, data: str | bytes) -> None:
        tmp = out / f".{name}.tmp"
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(out / name)

    atomic("report.json", msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    atomic("report.md", _markdown(report, samples))
    _chart(out / "report.png", report)


def _chart(path: Path, report: Report) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    agreement = f"agreement ({report.measure})" if report.measure else "agreement"
    panels = [
        (
            "tokens/s (single stream)",
            ["teacher", "student"],
            [report.teacher_tokens_per_s or 0.0, report.student_tokens_per_s or 0.0],
        ),
        (
            "parameters (M)",
            ["teacher", "student"],
            [(report.teacher_params or 0) / 1e6, (report.student_params or 0) / 1e6],
        ),
        (
            "agreement with teacher",
            [agreement, "exact", "ROUGE-L"],
            [report.agreement or 0.0, report.exact_agreement or 0.0, report.rouge_l or 0.0],
        ),
    ]
    for i, (title, labels, values) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, i)
        bars = ax.bar(labels, values, color=["#888", "#2a7", "#27a"][: len(labels)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if i == 3:
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
