"""The whole pipeline on a tiny teacher (4-layer random Llama + LoRA), through the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adapters.synthetic import make_tiny_adapter, qa_pairs, style_answer
from distill.cli import distill_app
from gateway.students import StudentRegistry
from retort.db.store import PromptStore
from tests.tiny import make_tiny_base
from tests.unit.distill.conftest import REPORT_KEYS, record


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    import random

    home = tmp_path / "home"
    base = make_tiny_base(tmp_path / "tiny-base", layers=4)
    make_tiny_adapter(base, home / "adapters" / "bot", base_name="tiny-base")
    url = f"sqlite+aiosqlite:///{home / 'retort.db'}"
    pairs = qa_pairs(random.Random(0), 60)
    recs = [record(i, q, style_answer(a), model="tiny-base") for i, (q, a) in enumerate(pairs)]

    async def fill() -> None:
        async with PromptStore(url) as store:
            await store.insert_many(recs)

    asyncio.run(fill())
    config = {
        "home": str(home),
        "teacher": {"base_model": str(base), "base_model_name": "tiny-base"},
        "student": {"layers": 2},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1e-3,
            "early_stop": {"every": 2, "examples": 4, "patience": 5, "max_tokens": 4},
        },
        "export": {"precision": "fp32", "parity_prompts": 2, "parity_tokens": 6},
        "eval": {
            "max_examples": 4,
            "max_tokens": 8,
            "teacher_speed": "transformers",
            "speed_prompts": 2,
        },
        "gate": {
            "min_agreement": None,
            "min_rouge_l": None,
            "min_speedup": None,
            "max_param_ratio": 0.9,
        },
        "dataset": {"eval_fraction": 0.2},
    }
    cfg_path = tmp_path / "distill.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return {"home": home, "config": cfg_path, "url": Path(url), "base": base}


@pytest.mark.timeout(600)
def test_run_publishes_and_is_idempotent(setup: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "run",
        "--adapter",
        "bot",
        "--out",
        str(out),
        "--config",
        str(setup["config"]),
        "--publish",
        "--quiet",
    ]
    res = runner.invoke(distill_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report.keys() >= REPORT_KEYS
    assert report["student_model"] == "bot-student"
    assert report["student_params"] < report["teacher_params"]
    assert report["gate_passed"] is True
    assert report["published"] is True
    assert report["export"]["parity"]["exact"] == 1.0  # fp32 ONNX == torch, greedy
    # Styled sentences, all different: open text, measured by the teacher's likelihood.
    assert report["measure"] == "open"
    assert "open text" in report["eval"]["measure"]["reason"]
    assert 0.0 <= report["teacher_likelihood"] <= 1.0
    assert report["eval"]["disagreements"] == [
        d for d in report["eval"]["disagreements"] if d["score"] < 0.5
    ]
    # (The random tiny teacher finds every answer about equally likely: the held-out
    # agreement may reach 1 at the first evaluation, which stops training there.)
    early = report["train"]["early_stop"]
    assert [s for s, _ in early["history"]] in ([2], [2, 4])
    assert report["train"]["steps"] == early["history"][-1][0]
    assert set(report["stages"]) == {
        "select",
        "dataset",
        "label",
        "student",
        "train",
        "export",
        "eval",
        "publish",
    }
    assert report["total_seconds"] >= sum(report["stages"].values()) - 1.0
    assert (out / "report.md").is_file()
    assert (out / "report.png").stat().st_size > 0
    entry = StudentRegistry(setup["home"] / "students").get("bot-student", verify_hashes=True)
    assert entry.manifest.adapter == "bot"
    assert entry.manifest.teacher_model == "tiny-base"
    assert (entry.path / "report.json").is_file()

    # No new data: no new run.
    res = runner.invoke(distill_app, args)
    assert res.exit_code == 0, res.output
    assert "no new data" in res.output

    res = runner.invoke(distill_app, ["runs", "--config", str(setup["config"]), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines() if line.strip()]
    assert len(rows) == 1
    assert rows[0]["status"] == "succeeded"
    assert rows[0]["published"] is True
    assert rows[0]["watermark_count"] == 60

    # New data: a new run (earlier stages' outputs are rebuilt only where inputs changed).
    async def add() -> None:
        async with PromptStore(f"sqlite+aiosqlite:///{setup['home'] / 'retort.db'}") as store:
            await store.insert_many(
                [record(999, "What is the capital of Chile?", "Santiago.", model="tiny-base")]
            )

    asyncio.run(add())
    res = runner.invoke(distill_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "no new data" not in res.output
    res = runner.invoke(distill_app, ["runs", "--config", str(setup["config"]), "--json"])
    rows = [json.loads(line) for line in res.output.splitlines() if line.strip()]
    assert [r["watermark_count"] for r in rows] == [61, 60]


def test_stage_command_and_gate_failure(setup: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(
        distill_app,
        [
            "dataset",
            "--adapter",
            "bot",
            "--out",
            str(out),
            "--config",
            str(setup["config"]),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["train"] > 0
    assert (out / "dataset" / "train").is_dir()
    res = runner.invoke(
        distill_app,
        [
            "dataset",
            "--adapter",
            "nope",
            "--out",
            str(out),
            "--config",
            str(setup["config"]),
            "--quiet",
        ],
    )
    assert res.exit_code == 2
    assert "no adapter" in res.output


@pytest.mark.timeout(600)
def test_pruned_student_runs_through_to_eval(setup: dict[str, Path], tmp_path: Path) -> None:
    """A width-pruned student (calibrated on the train split) trains, exports and is
    evaluated; the frontier runner's point reads the report."""
    from distill.config import load_config
    from distill.frontier import point
    from distill.pipeline import run
    from distill.results import Report

    recipe = {"student": {"layers": 2, "intermediate_size": 64, "hidden_size": 48}}
    cfg = load_config(setup["config"], {k: dict(v) for k, v in recipe.items()})
    report = run(cfg, tmp_path / "pruned", until="eval", record=False, progress=False)
    assert isinstance(report, Report)
    init = report.student_init
    assert init is not None
    assert (init.intermediate_size, init.hidden_size) == (64, 48)
    cfg_json = json.loads((Path(init.path) / "config.json").read_text())
    assert (cfg_json["intermediate_size"], cfg_json["hidden_size"]) == (64, 48)
    p = point("tiny", recipe, report)
    assert p["student_params"] == init.student_params < init.teacher_params
    assert p["agreement"] is not None
    assert p["eval_examples"] == 4
    assert report.train is not None
    assert p["train_steps"] == report.train.steps
