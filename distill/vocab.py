"""A trimmed output vocabulary: the exported student's LM head keeps only the tokens its
task uses (``export.output_vocab: trimmed``).

A distilled student answers only its teacher's task, with a small set of tokens, yet its
LM head (49,152 x 576 for SmolLM2, 28.3 M parameters) is computed for every row at every
decode step. :func:`kept_ids` chooses the tokens: those of the teacher's completions in the
train split, every special and end token, and the ``extra`` lowest ids (in a byte-level BPE
tokenizer the single bytes and the earliest, most frequent merges, so any text stays
spellable). :func:`trim_lm_head` slices the exported graph's final ``MatMul`` or int4
``MatMulNBits`` to those rows (new initializers: the embedding, tied to the head, keeps the
full table) and writes :data:`~gateway.engines.onnx_batch.VOCAB_MAP_FILE` beside the model.
The serving runner (:class:`~gateway.engines.onnx_batch.OrtRunner`) scatters the logits back
to the full vocabulary with ``-inf`` elsewhere: tokens outside the kept set get probability 0.

Training stays full-vocabulary; only the export is trimmed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.engines.onnx_batch import VOCAB_MAP_FILE

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["TrimError", "answer_ids", "check_graph", "kept_ids", "special_ids", "trim_lm_head"]


class TrimError(RuntimeError):
    """The exported graph's LM head is not one this module can slice."""


def answer_ids(tokenizer: Any, example: dict[str, Any]) -> set[int]:
    """Token ids of one dataset example's completion: as tokenized alone, and as it follows
    its prompt (the chat template's assistant turn, with its end token, or the raw prompt)."""
    completion = str(example.get("completion") or "")
    ids = set(tokenizer.encode(completion, add_special_tokens=False))
    messages = example.get("messages")
    if messages:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], tokenize=True
        )
        prompt, full = _ids(prompt), _ids(full)
    else:
        text = str(example.get("prompt") or "")
        prompt = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.encode(text + completion, add_special_tokens=False)
    if full[: len(prompt)] == prompt:
        ids.update(full[len(prompt) :])
    return {int(t) for t in ids}


def _ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def special_ids(tokenizer: Any, onnx_dir: Path, model_dir: Path | None = None) -> set[int]:
    """Every special/added token of the tokenizer and every end token the runner and the
    generation config name (``genai_config.json``, ``generation_config.json``, ``config.json``)."""
    ids = {int(t) for t in tokenizer.all_special_ids}
    ids.update(int(t) for t in getattr(tokenizer, "added_tokens_decoder", {}))
    configs = [Path(onnx_dir) / "genai_config.json"]
    if model_dir is not None:
        configs += [Path(model_dir) / "generation_config.json", Path(model_dir) / "config.json"]
    for file in configs:
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        data = data.get("model", data)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = data.get(key)
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, int):
                    ids.add(t)
    return ids


def kept_ids(
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    vocab_size: int,
    *,
    extra: int,
    specials: Iterable[int],
) -> list[int]:
    """The ids to keep, ascending: the completions' tokens, ``specials`` and ids ``0..extra-1``."""
    if extra < 0:
        raise ValueError("output_vocab_extra must be >= 0")
    ids = set(range(min(extra, vocab_size)))
    ids.update(specials)
    for example in examples:
        ids.update(answer_ids(tokenizer, example))
    out = sorted(t for t in ids if 0 <= t < vocab_size)
    if len(out) != len(ids):
        raise ValueError(f"token ids outside the vocabulary of {vocab_size}")
    return out


def check_graph(model_file: Path) -> None:
    """Load ``model_file`` as the server will (onnxruntime, CPU, all graph optimizations and
    type/shape inference). ``onnx.checker`` cannot judge these graphs: it rejects the builder's
    own untouched output (``SimplifiedLayerNormalization`` is onnxruntime's, registered in
    the default domain)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TrimError(f"the trimmed graph does not load: {exc}") from exc


def trim_lm_head(onnx_dir: Path, ids: Sequence[int], vocab_size: int) -> int:
    """Slice ``onnx_dir``'s LM head to the rows ``ids`` (in place, atomically: the model is
    written to a temporary folder and moved over); writes the vocabulary map beside it.
    Returns the number of kept ids."""
    import onnx
    from onnx import numpy_helper

    onnx_dir = Path(onnx_dir)
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    dec = config["model"]["decoder"]
    logits_name = dec["outputs"].get("logits", "logits")
    model_file = onnx_dir / dec["filename"]
    keep = np.asarray(ids, np.int64)
    if not len(keep) or (np.diff(keep) <= 0).any() or keep[0] < 0 or keep[-1] >= vocab_size:
        raise ValueError("ids must be non-empty, ascending, unique and below the vocabulary")
    model = onnx.load(str(model_file))
    graph = model.graph
    head = next((n for n in graph.node if logits_name in n.output), None)
    if head is None:
        raise TrimError(f"no node produces {logits_name}")
    inits = {t.name: t for t in graph.initializer}

    def sliced(index: int, axis: int) -> None:
        name = head.input[index]
        if name not in inits:
            raise TrimError(f"{head.name}'s input {name} is not a constant")
        array = numpy_helper.to_array(inits[name])
        flat = array.ndim == 1
        if flat:  # MatMulNBits allows [N * blocks] scales and zero points
            array = array.reshape(vocab_size, -1)
        if array.shape[axis] != vocab_size:
            raise TrimError(f"{name} has {array.shape[axis]} rows, not {vocab_size}")
        part = np.take(array, keep, axis=axis)
        tensor = numpy_helper.from_array(part.reshape(-1) if flat else part, f"{name}.trimmed")
        graph.initializer.append(tensor)
        head.input[index] = tensor.name  # new tensors: a tied embedding keeps the originals

    if head.op_type == "MatMul":
        sliced(1, 1)  # B [hidden, vocab]
    elif head.op_type == "MatMulNBits":
        attrs = {a.name: a for a in head.attribute}
        if int(attrs["N"].i) != vocab_size:
            raise TrimError(f"{head.name} has N={attrs['N'].i}, not {vocab_size}")
        if len(head.input) > 4 and head.input[4]:
            raise TrimError(f"{head.name} has g_idx: not supported")
        for index in (1, 2, 3, 5):  # B [N, blocks, blob], scales, zero points, bias
            if index < len(head.input) and head.input[index]:
                sliced(index, 0)
        attrs["N"].i = len(keep)
    else:
        raise TrimError(f"{logits_name} comes from {head.op_type}: not a MatMul LM head")
    out = next(o for o in graph.output if o.name == logits_name)
    dims = out.type.tensor_type.shape.dim
    dims[len(dims) - 1].ClearField("dim_param")
    dims[len(dims) - 1].dim_value = len(keep)

    tmp = onnx_dir.with_name(f".{onnx_dir.name}.trim")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        data = f"{model_file.name}.data"
        onnx.save_model(
            model,
            str(tmp / model_file.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=1024,
        )
        check_graph(tmp / model_file.name)
        (tmp / VOCAB_MAP_FILE).write_text(
            json.dumps({"vocab_size": vocab_size, "ids": [int(t) for t in keep]})
        )
        for file in (model_file.name, data, VOCAB_MAP_FILE):
            (tmp / file).chmod(0o644)
            (tmp / file).replace(onnx_dir / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(keep)
