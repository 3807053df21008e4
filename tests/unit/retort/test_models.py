"""Default-model provisioning: converted once, atomically, safe under concurrent callers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from retort import models


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Replace the (30 s) GGUF conversion with a small write; count the calls."""
    calls: list[int] = []
    gguf = tmp_path / "src.gguf"
    gguf.write_bytes(b"gguf-bytes")
    monkeypatch.setattr(models, "default_gguf", lambda: gguf)

    def convert(src: Path, out: Path) -> None:
        calls.append(1)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"\0" * 1024)

    monkeypatch.setattr(models, "_convert", convert)
    return calls


def test_converts_once(tmp_path: Path, fake_convert: list[int]) -> None:
    home = tmp_path / "home"
    first = models.pull_default(home)
    second = models.pull_default(home)
    assert first == second == home / "models" / models.DEFAULT_MODEL_NAME
    assert fake_convert == [1]
    assert models.verify_manifest(first)
    leftovers = [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [models.DEFAULT_MODEL_NAME]


def test_concurrent_callers_convert_once(tmp_path: Path, fake_convert: list[int]) -> None:
    home = tmp_path / "home"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.pull_default(home))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert len(set(results)) == 1
    assert fake_convert == [1]


def test_corruption_is_detected_and_repaired(tmp_path: Path, fake_convert: list[int]) -> None:
    home = tmp_path / "home"
    folder = models.pull_default(home)
    (folder / "model.safetensors").write_bytes(b"corrupt")
    assert not models.verify_manifest(folder)
    models.pull_default(home)
    assert fake_convert == [1, 1]
    assert models.verify_manifest(folder)


def test_failed_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_convert: list[int]
) -> None:
    def boom(src: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert", boom)
    home = tmp_path / "home"
    with pytest.raises(RuntimeError):
        models.pull_default(home)
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_other_models_pass_through(tmp_path: Path) -> None:
    assert models.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    assert models.resolve_model("/models/llama", tmp_path) == "/models/llama"
