"""A trimmed output vocabulary (distill/vocab.py) on real tiny exports (fp32 and int4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.config import ExportConfig
from distill.export import export_stage, greedy_runner
from distill.vocab import TrimError, kept_ids, special_ids, trim_lm_head
from gateway.engines.onnx_batch import VOCAB_MAP_FILE, OrtRunner
from gateway.students import StudentNotFoundError, StudentRegistry

pytest.importorskip("onnxruntime_genai")

PROMPTS = [[5, 6, 7, 8, 9], [30, 31, 32], [100, 120, 140, 160, 180, 200]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("vocab")
    base = make_tiny_base(root / "base", seed=3, hidden_size=64, context=256)
    return {
        "base": base,
        "fp32": build_onnx(base, root / "fp32", "fp32"),
        "int4": build_onnx(base, root / "int4", "int4"),
    }


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "onnx"))


def _vocab(onnx_dir: Path) -> int:
    return int(json.loads((onnx_dir / "genai_config.json").read_text())["model"]["vocab_size"])


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_trimmed_logits_equal_the_full_models_at_kept_ids(
    exports: dict[str, Path], tmp_path: Path, precision: str
) -> None:
    import onnx

    full_dir = exports[precision]
    size = _vocab(full_dir)
    ids = list(range(0, size, 3))
    trimmed = _copy(full_dir, tmp_path)
    assert trim_lm_head(trimmed, ids, size) == len(ids)

    graph = onnx.load(str(trimmed / "model.onnx"), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[2].dim_value == len(ids)
    head = next(n for n in graph.node if "logits" in n.output)
    assert all(i.endswith(".trimmed") for i in head.input[1:] if i)
    assert json.loads((trimmed / VOCAB_MAP_FILE).read_text()) == {"vocab_size": size, "ids": ids}

    full, cut = OrtRunner(full_dir), OrtRunner(trimmed)
    assert cut.output_vocab == len(ids)
    assert full.output_vocab is None
    a, b = full.prefill(0, PROMPTS[0]), cut.prefill(0, PROMPTS[0])
    full.prefill(1, PROMPTS[1])
    cut.prefill(1, PROMPTS[1])
    lengths = np.asarray([len(PROMPTS[0]), len(PROMPTS[1])])
    da, db = full.decode(np.asarray([42, 43]), lengths), cut.decode(np.asarray([42, 43]), lengths)
    dropped = np.setdiff1d(np.arange(size), ids)
    for x, y in ((a, b), (da[0], db[0]), (da[1], db[1])):
        assert y.shape == (size,)
        np.testing.assert_allclose(y[ids], x[ids], rtol=1e-5, atol=1e-5)
        assert np.isneginf(y[dropped]).all()


def test_greedy_tokens_equal_when_answers_use_kept_tokens(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    full_dir = exports["int4"]
    size = _vocab(full_dir)
    full = greedy_runner(full_dir, PROMPTS, 12)
    used = sorted({t for answer in full for t in answer})
    eos = json.loads((full_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    ids = sorted({*used, *(eos if isinstance(eos, list) else [eos])})
    assert len(ids) < size / 4  # a real trim
    trimmed = _copy(full_dir, tmp_path)
    trim_lm_head(trimmed, ids, size)
    assert greedy_runner(trimmed, PROMPTS, 12) == full
    # And the check can tell: without the first answer's first token, that answer changes.
    lost = _copy(full_dir, tmp_path / "lost")
    trim_lm_head(lost, [t for t in ids if t != full[0][0]], size)
    assert greedy_runner(lost, PROMPTS[:1], 12)[0] != full[0]


def test_kept_ids_are_answers_specials_and_the_lowest_ids(exports: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(exports["base"]))
    hi = [{"role": "user", "content": "hi"}]
    examples: list[dict[str, Any]] = [
        {"messages": hi, "prompt": "", "completion": "Arr matey"},
        {"messages": [], "prompt": "Q: sea?", "completion": " Ahoy"},
    ]
    specials = special_ids(tok, exports["fp32"], exports["base"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert {0, 1, 2, end} <= specials  # the three specials; <|im_end|> is eos
    ids = kept_ids(tok, examples, len(tok), extra=10, specials=specials)
    # the answers alone, and as they follow their prompts (the chat turn ends with its
    # end token and a newline; BPE may split a word differently there)
    reply = {"role": "assistant", "content": "Arr matey"}
    turn = tok.apply_chat_template([*hi, reply])["input_ids"]
    prompt = tok.apply_chat_template(hi, add_generation_prompt=True)
    turn = turn[len(prompt["input_ids"]) :]
    assert tok.decode(turn) == "Arr matey<|im_end|>\n"
    answers = set(tok.encode("Arr matey")) | set(tok.encode(" Ahoy")) | set(turn)
    answers |= set(tok.encode("Q: sea? Ahoy")[len(tok.encode("Q: sea?")) :])
    assert ids == sorted(set(range(10)) | specials | answers)
    assert len(ids) < len(tok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kept_ids(tok, [], 5, extra=0, specials=[7])


def test_bad_maps_and_ids_are_refused(exports: dict[str, Path], tmp_path: Path) -> None:
    trimmed = _copy(exports["fp32"], tmp_path)
    size = _vocab(trimmed)
    with pytest.raises(ValueError, match="ascending"):
        trim_lm_head(trimmed, [3, 2], size)
    with pytest.raises(TrimError, match="rows"):
        trim_lm_head(trimmed, [1, 2], size + 1)
    trim_lm_head(trimmed, [0, 1, 2, 3], size)
    (trimmed / VOCAB_MAP_FILE).write_text(json.dumps({"vocab_size": size, "ids": [0, 1, 2]}))
    with pytest.raises(ValueError, match="keeps 3 tokens but the model's logits has 4"):
        OrtRunner(trimmed)
    (trimmed / VOCAB_MAP_FILE).write_text(json.dumps({"vocab_size": size, "ids": [0, 2, 1, 3]}))
    with pytest.raises(ValueError, match="ascending"):
        OrtRunner(trimmed)


def test_export_stage_trims_and_the_registry_hashes_the_map(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    base = exports["base"]
    messages = [[{"role": "user", "content": "What is the sea?"}]]
    train = [{"messages": messages[0], "prompt": "", "completion": "Ahoy! The sea. Arr!"}]
    config = ExportConfig(
        precision="int4", output_vocab="trimmed", output_vocab_extra=64, parity_prompts=1
    )
    with pytest.raises(ValueError, match="train split"):
        export_stage(base, tmp_path / "run0", config, messages)
    result = export_stage(base, tmp_path / "run", config, messages, train, train_fingerprint="x")
    assert result.vocab is not None
    onnx_dir = Path(result.onnx)
    kept = json.loads((onnx_dir / VOCAB_MAP_FILE).read_text())["ids"]
    assert result.vocab.kept == len(kept) < result.vocab.vocab_size == _vocab(onnx_dir)
    assert set(range(64)) <= set(kept)
    assert 0 <= result.vocab.parity.exact <= 1

    registry = StudentRegistry(tmp_path / "students")
    entry = registry.publish("trim-student", onnx_dir, teacher_model="base")
    assert f"onnx/{VOCAB_MAP_FILE}" in entry.manifest.sha256
    registry.get("trim-student", verify_hashes=True)
    stored = entry.onnx_path / VOCAB_MAP_FILE
    data = json.loads(stored.read_text())
    data["ids"] = data["ids"][:-1]
    stored.write_text(json.dumps(data))
    with pytest.raises(StudentNotFoundError, match=r"vocab_map\.json does not match its sha256"):
        registry.get("trim-student", verify_hashes=True)


@pytest.mark.timeout(600)
def test_pipeline_evaluates_the_trimmed_student(tmp_path: Path) -> None:
    """``export.output_vocab: trimmed`` through the pipeline: the map is written from the
    train split's answers, and the eval stage serves that same trimmed folder."""
    import asyncio
    import random

    from adapters.synthetic import make_tiny_adapter, qa_pairs, style_answer
    from distill.config import load_config
    from distill.pipeline import run
    from retort.db.store import PromptStore
    from tests.tiny import make_tiny_base
    from tests.unit.distill.conftest import record

    home = tmp_path / "home"
    base = make_tiny_base(tmp_path / "tiny-base", layers=2)
    make_tiny_adapter(base, home / "adapters" / "bot", base_name="tiny-base")
    url = f"sqlite+aiosqlite:///{home / 'retort.db'}"
    pairs = qa_pairs(random.Random(0), 40)
    recs = [record(i, q, style_answer(a), model="tiny-base") for i, (q, a) in enumerate(pairs)]

    async def fill() -> None:
        async with PromptStore(url) as store:
            await store.insert_many(recs)

    asyncio.run(fill())
    cfg = load_config(
        None,
        {
            "home": str(home),
            "adapter": "bot",
            "teacher": {"base_model": str(base), "base_model_name": "tiny-base"},
            "student": {"layers": 1},
            "train": {"max_steps": 2, "batch_size": 4},
            "export": {
                "precision": "int4",
                "parity_prompts": 2,
                "parity_tokens": 6,
                "output_vocab": "trimmed",
                "output_vocab_extra": 8,
            },
            "eval": {"max_examples": 2, "max_tokens": 6, "teacher_speed": "skip"},
            "dataset": {"eval_fraction": 0.2},
        },
    )
    report = run(cfg, tmp_path / "run", until="eval", record=False, progress=False)
    assert report.export is not None
    assert report.export.vocab is not None
    onnx_dir = Path(report.export.onnx)
    kept = json.loads((onnx_dir / VOCAB_MAP_FILE).read_text())["ids"]
    assert report.export.vocab.kept == len(kept) < report.export.vocab.vocab_size
    from transformers import AutoTokenizer

    from distill.dataset import load_splits

    tok: Any = AutoTokenizer.from_pretrained(str(base))
    assert report.teacher is not None
    train = load_splits(Path(report.teacher.labels))[0]
    assert train
    for example in train:
        assert set(tok.encode(example["completion"])) <= set(kept)
    # eval served this folder (OnnxEngine reads its map: tests/unit/gateway/test_onnx_vocab.py)
    assert report.eval is not None
    samples = (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == report.eval.examples == 2
