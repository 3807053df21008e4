from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.cli import adapters_app
from adapters.synthetic import make_style_dataset

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, tiny_base: Path, root: Path) -> Path:
    path = tmp_path / "retort.yaml"
    path.write_text(f"model:\n  path: {tiny_base}\nadapters:\n  dir: {root}\n")
    return path


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(adapters_app, list(args))
    return result.exit_code, result.output


def test_import_list_validate_remove(config: Path, raw_adapter: Path, root: Path) -> None:
    code, out = _run("import", str(raw_adapter), "--name", "style-a", "--config", str(config))
    assert code == 0, out
    assert "imported style-a" in out
    code, out = _run("list", "--json", "--config", str(config))
    assert code == 0, out
    [row] = json.loads(out)
    assert row["name"] == "style-a"
    assert row["valid"]
    assert row["manifest"]["rank"] == 8
    code, out = _run("list", "--config", str(config))
    assert code == 0, out
    assert "style-a" in out
    code, out = _run("validate", "style-a", "--config", str(config))
    assert code == 0, out
    assert "ok:" in out
    code, out = _run("validate", str(raw_adapter), "--config", str(config))
    assert code == 0, out  # a folder outside the root can be checked before importing
    code, out = _run("validate", "../style-a", "--config", str(config))
    assert code == 1
    assert "'..' is not allowed" in out
    code, out = _run("import", str(raw_adapter), "--name", "style-a", "--config", str(config))
    assert code == 1
    assert "already exists" in out
    code, out = _run("remove", "style-a", "--config", str(config))
    assert code == 0, out
    code, out = _run("remove", "style-a", "--config", str(config))
    assert code == 1
    assert "no adapter named" in out
    assert not (root / "style-a").exists()


def test_root_option_overrides_settings(
    config: Path, raw_adapter: Path, tmp_path: Path, root: Path
) -> None:
    other = tmp_path / "other-root"
    code, out = _run(
        "import", str(raw_adapter), "--name", "x", "--root", str(other), "--config", str(config)
    )
    assert code == 0, out
    assert (other / "x" / "retort.json").is_file()
    assert not (root / "x").exists()


def test_validate_reports_the_reason(config: Path, raw_adapter: Path, root: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(raw_adapter, root / "bad"))
    (folder / "adapter_model.bin").write_bytes(b"x")
    code, out = _run("validate", "bad", "--config", str(config))
    assert code == 1
    assert "adapter_model.bin is a pickle-based file" in out


def test_train(config: Path, tmp_path: Path, root: Path) -> None:
    data = make_style_dataset(tmp_path / "d.jsonl", n=8)
    code, out = _run(
        "train", "--data", str(data), "--name", "t", "--rank", "4", "--alpha", "8",
        "--targets", "q_proj,k_proj,v_proj", "--max-steps", "2", "--batch-size", "4",
        "--quiet", "--config", str(config),
    )  # fmt: skip
    assert code == 0, out
    assert "trained t: 2 steps" in out
    manifest = json.loads((root / "t" / "retort.json").read_text())
    assert manifest["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    code, out = _run("validate", "t", "--config", str(config))
    assert code == 0, out


def test_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nope: 1\n")
    code, out = _run("list", "--config", str(path))
    assert code == 2
    assert "error:" in out
