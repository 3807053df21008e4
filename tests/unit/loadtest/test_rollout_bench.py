"""``loadtest.rollout_bench --distilled RUN``: what it takes from a pipeline's run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.students import StudentRegistry
from loadtest.rollout_bench import _distilled


def _run(tmp_path: Path, adapter: str | None) -> tuple[Path, Path]:
    from datasets import Dataset

    run, adapters = tmp_path / "run", tmp_path / "adapters"
    (adapters / "sentiment").mkdir(parents=True)
    (adapters / "sentiment" / "adapter_config.json").write_text("{}")
    onnx = run / "export" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "genai_config.json").write_text("{}")
    (onnx / "model.onnx").write_bytes(b"weights")
    (run / "export" / "stage.json").write_text(
        json.dumps({"result": {"onnx": str(onnx), "precision": "int4"}})
    )
    report = {
        "student_model": "sentiment-student",
        "teacher_model": "SmolLM2-135M-Instruct",
        "adapter": adapter,
        "agreement": 0.96,
        "measure": "exact",
    }
    (run / "report.json").write_text(json.dumps(report))
    rows = [
        {"messages": [{"role": "user", "content": f"Review: {i}. Positive or negative?"}]}
        for i in range(3)
    ] + [{"messages": None, "prompt": "raw"}]
    Dataset.from_list(rows).save_to_disk(str(run / "dataset" / "eval"))
    return run, adapters


def test_the_student_is_published_beside_its_adapter(tmp_path: Path) -> None:
    run, adapters = _run(tmp_path, "sentiment")
    home = tmp_path / "home"
    report, prompts = _distilled(run, adapters, home)
    assert report["agreement"] == 0.96
    assert prompts == [f"Review: {i}. Positive or negative?" for i in range(3)]
    assert (home / "adapters" / "sentiment" / "adapter_config.json").is_file()
    manifest = StudentRegistry(home / "students").get("sentiment-student").manifest
    assert manifest.adapter == "sentiment"
    assert manifest.precision == "int4"


def test_a_student_of_the_base_model_is_refused(tmp_path: Path) -> None:
    run, adapters = _run(tmp_path, None)
    with pytest.raises(SystemExit, match="no adapter"):
        _distilled(run, adapters, tmp_path / "home")
