from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adapters.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    encode_chat,
    label_tokens,
    read_chat_jsonl,
)
from adapters.errors import AdapterExistsError
from adapters.manifest import WEIGHTS_FILE, read_manifest
from adapters.registry import AdapterRegistry
from adapters.synthetic import HELD_OUT_PROMPTS, has_style, make_style_dataset, style_answer
from adapters.train import TrainConfig, causal_lm_loss, collate, train_result

from .conftest import BASE_NAME

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "Ahoy! 4. Arr!"},
    {"role": "user", "content": "And the capital of Peru?"},
    {"role": "assistant", "content": "Ahoy! Lima. Arr!"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


# --------------------------------------------------------------------- the loss mask


def test_mask_covers_exactly_the_assistant_turns(tokenizer: object) -> None:
    ex = encode_chat(tokenizer, CHAT, max_len=512)  # type: ignore[arg-type]
    learned = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    decode = tokenizer.decode  # type: ignore[attr-defined]
    assert decode(learned) == "Ahoy! 4. Arr!<|im_end|>\nAhoy! Lima. Arr!<|im_end|>\n"
    ignored = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE_INDEX]
    text = decode(ignored)
    assert "Be brief." in text
    assert "What is 2 plus 2?" in text
    assert "Peru" in text
    assert "Ahoy" not in text
    assert all(lab in (t, IGNORE_INDEX) for t, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_no_assistant_turn_learns_nothing(tokenizer: object) -> None:
    # No assistant turn: nothing is learned.
    ex = encode_chat(tokenizer, CHAT[:2], max_len=512)  # type: ignore[arg-type]
    assert set(ex.labels) == {IGNORE_INDEX}


def test_truncation(tokenizer: object) -> None:
    full = encode_chat(tokenizer, CHAT, max_len=512)  # type: ignore[arg-type]
    cut = encode_chat(tokenizer, CHAT, max_len=10)  # type: ignore[arg-type]
    assert cut.input_ids == full.input_ids[:10]
    assert cut.labels == full.labels[:10]


def test_label_tokens_is_pure() -> None:
    ids = [10, 11, 12, 13, 14]
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert label_tokens(ids, offsets, [(3, 9)]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, -100]
    assert label_tokens(ids, offsets, []) == [IGNORE_INDEX] * 5
    assert label_tokens(ids, offsets, [(0, 12)]) == [10, 11, 12, IGNORE_INDEX, 14]


# --------------------------------------------------------------------- the loss


def test_loss_known_values_and_masking() -> None:
    vocab = 7
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    uniform = torch.zeros(1, 4, vocab)
    assert causal_lm_loss(uniform, labels).item() == pytest.approx(math.log(vocab))
    # logits[:, t] predicts labels[:, t + 1]: make positions 0 and 1 certain of 2 and 3.
    perfect = torch.full((1, 4, vocab), -1e4)
    perfect[0, 0, 2] = perfect[0, 1, 3] = 1e4
    assert causal_lm_loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    # What the model says at masked targets (position 2 predicts the ignored label) is free.
    changed = perfect.clone()
    changed[0, 2] = torch.randn(vocab)
    changed[0, 3] = torch.randn(vocab)
    assert causal_lm_loss(changed, labels).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.randn(1, 4, vocab)
    assert causal_lm_loss(same, labels).item() == causal_lm_loss(same.clone(), labels).item()


def test_collate_pads_and_masks() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# --------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json\n", "not JSON"),
        ('{"prompt": "x"}\n', "expected"),
        ('{"messages": [{"role": "user"}]}\n', "string role and content"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant messages"),
    ],
)
def test_read_chat_jsonl_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_chat_jsonl(path)


def test_style_dataset(tmp_path: Path) -> None:
    path = make_style_dataset(tmp_path / "d.jsonl", n=20)
    rows = read_chat_jsonl(path)
    assert len(rows) == 20
    assert all(has_style(r[-1]["content"]) and r[-1]["role"] == "assistant" for r in rows)
    questions = {r[0]["content"] for r in rows}
    assert not questions & set(HELD_OUT_PROMPTS)
    caps = read_chat_jsonl(make_style_dataset(tmp_path / "c.jsonl", n=5, style="caps"))
    assert all(has_style(r[-1]["content"], "caps") for r in caps)
    assert not has_style("Paris is the capital.")
    assert not has_style("Paris", "caps")
    assert style_answer("x") == "Ahoy! x Arr!"


# --------------------------------------------------------------------- training


def test_train_writes_a_registry_ready_adapter(tiny_base: Path, tmp_path: Path) -> None:
    data = make_style_dataset(tmp_path / "d.jsonl", n=12)
    root = tmp_path / "root"
    config = TrainConfig(
        data=data, name="pirate", base_model=tiny_base, out_root=root, rank=4, alpha=8,
        max_steps=3, batch_size=4, lr=1e-3,
    )  # fmt: skip
    result = train_result(config, progress=False)
    folder = root / "pirate"
    assert result.path == folder
    assert len(result.losses) == 3
    assert all(math.isfinite(x) for x in result.losses)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == BASE_NAME
    assert adapter_config["r"] == 4
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((folder / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3]
    assert log["examples"] == 12
    assert log["assistant_tokens"] > 0
    assert not (folder / "adapter_model.bin").exists()
    manifest = read_manifest(folder)
    assert manifest is not None
    assert manifest.source == "trained"
    assert manifest.metrics is not None
    assert manifest.metrics["final_loss"] == result.losses[-1]
    registry = AdapterRegistry(root, BASE_NAME, tiny_base, max_lora_rank=16)
    assert registry.validate(folder) == manifest
    assert [e.name for e in registry.list()] == ["pirate"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".staging")] == []
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * 2  # layers x (q, v) x (A, B)

    with pytest.raises(AdapterExistsError):
        train_result(config, progress=False)


def test_training_progress_prints_plain_lines_in_a_log() -> None:
    """Under nohup, a Job or CI rich draws no live bar: training still says where it is."""
    import io

    from rich.console import Console

    from adapters.train import training_progress

    out = io.StringIO()
    bar = training_progress(True, console=Console(file=out, force_terminal=False), every_s=0.0)
    with bar:
        task = bar.add_task("distilling s", total=3, loss=float("nan"))
        for loss in (2.5, 1.25, 0.5):
            bar.update(task, advance=1, loss=loss)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("distilling s: step")]
    assert lines[0].startswith("distilling s: step 1/3, loss 2.5000")
    assert lines[-1].startswith("distilling s: step 3/3, loss 0.5000")
    assert "left" not in lines[-1]

    quiet = io.StringIO()
    with training_progress(False, console=Console(file=quiet, force_terminal=False)) as off:
        off.update(off.add_task("x", total=1, loss=0.0), advance=1, loss=0.0)
    assert "step" not in quiet.getvalue()
