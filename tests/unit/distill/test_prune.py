"""Width pruning (distill.prune) and its place in the student stage, on the tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distill.config import StudentConfig
from distill.prune import PruneError, channel_importance, prune_width
from distill.student import StudentInitError, count_params, student_stage
from tests.tiny import make_tiny_base

# The tiny base: vocab V, hidden 64, MLP 128, 4 heads of 16 (2 KV heads), tied head.
_CALIB = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]]


def _tiny(tmp_path: Path, layers: int = 4) -> Any:
    from transformers import AutoModelForCausalLM

    base = make_tiny_base(tmp_path / "teacher", layers=layers)
    return base, AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)


def _expected_params(vocab: int, layers: int, hidden: int, inter: int) -> int:
    # q, o: hidden x (4 * 16); k, v: hidden x (2 * 16); MLP: 3 * hidden * inter; 2 norms.
    per_layer = 2 * hidden * 64 + 2 * hidden * 32 + 3 * hidden * inter + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def test_importance_ranks_the_active_channels(tmp_path: Path) -> None:
    _, model = _tiny(tmp_path, layers=2)
    with torch.no_grad():  # silence MLP channel 7 of layer 0: its activation is exactly 0
        model.model.layers[0].mlp.up_proj.weight[7].zero_()
        model.model.embed_tokens.weight[:, 3].mul_(100.0)  # and make hidden channel 3 loud
    inter, hidden = channel_importance(model, _CALIB)
    assert [t.shape[0] for t in inter] == [128, 128]
    assert inter[0][7] == 0
    assert int(torch.argmin(inter[0])) == 7
    assert hidden.shape == (64,)
    assert int(torch.argmax(hidden)) == 3
    pruned = prune_width(model, _CALIB, intermediate_size=127)
    # the silent channel is the one cut: the layer computes exactly what it did
    assert pruned.model.layers[0].mlp.down_proj.in_features == 127


def test_pruned_shapes_params_and_same_function_when_nothing_is_cut(tmp_path: Path) -> None:
    _, model = _tiny(tmp_path)
    vocab = model.config.vocab_size
    ids = torch.tensor([_CALIB[0]])
    before = model(input_ids=ids).logits
    assert model.num_parameters() == _expected_params(vocab, 4, 64, 128)
    same = prune_width(model, _CALIB, intermediate_size=128, hidden_size=64)
    assert torch.allclose(same(input_ids=ids).logits, before)
    prune_width(model, _CALIB, intermediate_size=48, hidden_size=40)
    assert model.config.intermediate_size == 48
    assert model.config.hidden_size == 40
    assert model.config.head_dim == 16
    layer = model.model.layers[1]
    assert layer.mlp.gate_proj.weight.shape == (48, 40)
    assert layer.mlp.down_proj.weight.shape == (40, 48)
    assert layer.self_attn.q_proj.weight.shape == (64, 40)
    assert layer.self_attn.k_proj.weight.shape == (32, 40)
    assert layer.self_attn.o_proj.weight.shape == (40, 64)
    assert layer.input_layernorm.weight.shape == (40,)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == _expected_params(vocab, 4, 40, 48)
    assert model(input_ids=ids).logits.shape == before.shape


def test_bad_widths_refused(tmp_path: Path) -> None:
    _, model = _tiny(tmp_path, layers=1)
    with pytest.raises(PruneError, match="intermediate_size"):
        prune_width(model, _CALIB, intermediate_size=129)
    with pytest.raises(PruneError, match="hidden_size"):
        prune_width(model, _CALIB, hidden_size=0)
    # A width transformers could not save (it checks hidden % heads), refused before work.
    with pytest.raises(PruneError, match=r"multiple of the 4 attention heads .*48 or 52"):
        prune_width(model, _CALIB, hidden_size=50)
    with pytest.raises(PruneError, match="calibration"):
        prune_width(model, [], intermediate_size=8)


def test_student_stage_prunes_loads_and_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from distill.export import build_onnx, greedy_onnx, greedy_torch

    teacher, _ = _tiny(tmp_path)
    examples = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "completion": "Arr"}
        for i in range(4)
    ]
    cfg = StudentConfig(layers=2, intermediate_size=32, hidden_size=48, calibration_examples=3)
    with pytest.raises(StudentInitError, match="calibration"):
        student_stage(teacher, tmp_path / "bad", cfg)
    result = student_stage(teacher, tmp_path / "run", cfg, examples, "fp")
    path = Path(result.path)
    assert (result.intermediate_size, result.hidden_size) == (32, 48)
    student: Any = AutoModelForCausalLM.from_pretrained(str(path))
    vocab = student.config.vocab_size
    assert result.student_params == count_params(path) == _expected_params(vocab, 2, 48, 32)
    assert student.num_parameters() == result.student_params
    onnx = build_onnx(path, tmp_path / "onnx", "fp32")
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    assert greedy_onnx(onnx, prompts, 4) == greedy_torch(path, prompts, 4)
