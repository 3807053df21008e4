from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.students import StudentError, StudentNotFoundError, StudentRegistry


def _fake_onnx(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 64}}))
    (path / "model.onnx").write_bytes(payload)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> StudentRegistry:
    return StudentRegistry(tmp_path / "students")


def test_empty(registry: StudentRegistry) -> None:
    assert registry.list() == []
    with pytest.raises(StudentNotFoundError):
        registry.get("nope")


def test_publish_list_get(registry: StudentRegistry, tmp_path: Path) -> None:
    onnx = _fake_onnx(tmp_path / "build" / "onnx")
    reports = tmp_path / "run"
    reports.mkdir()
    (reports / "report.json").write_text("{}")
    entry = registry.publish(
        "bot-student",
        onnx,
        teacher_model="base",
        adapter="bot",
        precision="int8",
        report={"agreement": 0.9},
        report_dir=reports,
    )
    assert entry.name == "bot-student"
    assert entry.onnx_path == registry.root / "bot-student" / "onnx"
    assert (entry.path / "report.json").is_file()
    assert entry.manifest.sha256.keys() == {"onnx/genai_config.json", "onnx/model.onnx"}
    assert [e.name for e in registry.list()] == ["bot-student"]
    got = registry.get("bot-student", verify_hashes=True)
    assert got.manifest.adapter == "bot"
    assert got.manifest.report == {"agreement": 0.9}
    # no leftovers
    assert [p.name for p in registry.root.iterdir() if not p.name.endswith(".lock")] == [
        "bot-student"
    ]


def test_republish_replaces(registry: StudentRegistry, tmp_path: Path) -> None:
    registry.publish("s", _fake_onnx(tmp_path / "a"), teacher_model="base")
    registry.publish("s", _fake_onnx(tmp_path / "b", b"new"), teacher_model="base2")
    entry = registry.get("s", verify_hashes=True)
    assert entry.manifest.teacher_model == "base2"
    assert (entry.onnx_path / "model.onnx").read_bytes() == b"new"
    assert len(registry.list()) == 1


def test_tampered_and_invalid(registry: StudentRegistry, tmp_path: Path) -> None:
    entry = registry.publish("s", _fake_onnx(tmp_path / "a"), teacher_model="base")
    (entry.onnx_path / "model.onnx").write_bytes(b"evil")
    registry.get("s")  # cheap check passes
    with pytest.raises(StudentNotFoundError, match="sha256"):
        registry.get("s", verify_hashes=True)
    (registry.root / "junk").mkdir()
    (registry.root / "junk" / "student.json").write_text("not json")
    assert [e.name for e in registry.list()] == ["s"]
    with pytest.raises(StudentError, match="invalid student name"):
        registry.get("../etc")
    with pytest.raises(StudentError, match="not an onnxruntime-genai"):
        registry.publish("t", tmp_path, teacher_model="base")
    registry.remove("s")
    assert registry.list() == []
