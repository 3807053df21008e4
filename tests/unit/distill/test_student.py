from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.config import StudentConfig
from distill.student import StudentInitError, count_params, layer_indices, student_stage
from tests.tiny import make_tiny_base


def test_layer_indices() -> None:
    assert layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layer_indices(30, 30) == list(range(30))
    assert layer_indices(4, 2) == [0, 3]
    assert layer_indices(4, 1) == [0]
    with pytest.raises(StudentInitError):
        layer_indices(4, 5)


def test_student_is_smaller_loadable_same_vocab(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = make_tiny_base(tmp_path / "teacher", layers=4)
    result = student_stage(teacher, tmp_path / "run", StudentConfig(layers=2))
    path = Path(result.path)
    assert result.layers == [0, 3]
    assert result.student_params < result.teacher_params
    assert result.student_params == count_params(path)
    student: Any = AutoModelForCausalLM.from_pretrained(str(path))
    t = AutoModelForCausalLM.from_pretrained(str(teacher))
    assert student.config.num_hidden_layers == 2
    assert student.config.vocab_size == t.config.vocab_size
    assert torch.equal(
        student.model.layers[1].mlp.up_proj.weight, t.model.layers[3].mlp.up_proj.weight
    )
    assert torch.equal(student.model.embed_tokens.weight, t.model.embed_tokens.weight)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(teacher)).chat_template
    out = student.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_source_vocab_checked(tmp_path: Path) -> None:
    teacher = make_tiny_base(tmp_path / "teacher", layers=2)
    other = make_tiny_base(tmp_path / "other", layers=1)
    result = student_stage(teacher, tmp_path / "run", StudentConfig(source=str(other)))
    assert result.path == str(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudentInitError, match="vocabulary"):
        student_stage(teacher, tmp_path / "run2", StudentConfig(source=str(other)))
