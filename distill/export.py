"""Stage 5, export: the trained student to ONNX with a KV cache (onnxruntime-genai builder).

The builder runs in a subprocess (``python -m onnxruntime_genai.models.builder``): it
prints a lot, keeps its caches in its own folder, and its memory goes when it exits. The
result is checked against the torch student: greedy tokens of both on sample prompts.
With ``output_vocab: trimmed`` the LM head is then sliced (:mod:`distill.vocab`) and the
trimmed model's greedy tokens are checked against the full model's, both decoded by the
serving runner (:func:`greedy_runner`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import ExportConfig
from distill.results import ExportResult, Parity, VocabTrim
from distill.stages import stage_done, write_stage

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ExportError",
    "build_onnx",
    "chat_ids",
    "export_stage",
    "greedy_ids",
    "greedy_onnx",
    "greedy_runner",
    "greedy_torch",
    "parity",
]


class ExportError(RuntimeError):
    """The builder failed."""


def build_onnx(
    model_dir: Path, out: Path, precision: str = "int4", *, log: Path | None = None
) -> Path:
    """Export a HF Llama folder to an onnxruntime-genai folder ``out`` (replaced atomically)."""
    if precision not in ("fp32", "int8", "int4"):
        raise ValueError(f"precision must be fp32, int8 or int4 (got {precision!r})")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    cache = out.with_name(f".{out.name}.cache")
    for p in (tmp, cache):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model_dir),
        "-o",
        str(tmp),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if log is not None:
            log.write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
        if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
            raise ExportError(f"onnxruntime-genai builder failed: {proc.stderr[-2000:]}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return out


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids, chat template applied, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def greedy_torch(model_dir: Path, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations by the torch model (token ids, eos excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return greedy_ids(model, prompts, max_new)


def greedy_ids(
    model: Any, prompts: Sequence[list[int]], max_new: int, *, batch_size: int = 1
) -> list[list[int]]:
    """Greedy continuations by a loaded torch model (eos excluded), ``batch_size`` prompts
    per ``generate`` call. One at a time (the default) is what the export's checks compare
    against; a batch (left-padded, masked) is for scoring many prompts quickly, where a
    padded row's logits may differ from the lone prompt's in the last float bits."""
    import torch
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = next(iter(eos_ids))
    gen = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad
    )
    outs: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(prompts), max(1, batch_size)):
            chunk = prompts[start : start + max(1, batch_size)]
            width = max(len(ids) for ids in chunk)
            x = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
            y = model.generate(
                x.to(model.device),
                attention_mask=mask.to(model.device),
                generation_config=gen,
                use_cache=True,
            )
            for row in y[:, width:]:
                toks = [int(t) for t in row]
                cut = next((i for i, t in enumerate(toks) if t in eos_ids), len(toks))
                outs.append(toks[:cut])
    return outs


def greedy_onnx(onnx_dir: Path, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations by the ONNX model (token ids, eos excluded), with
    onnxruntime-genai's generator: full-vocabulary models only (a trimmed one's logits
    are not token ids; :func:`greedy_runner` decodes those)."""
    import numpy as np
    import onnxruntime_genai as og

    from gateway.engines.onnx_batch import VOCAB_MAP_FILE

    if (Path(onnx_dir) / VOCAB_MAP_FILE).is_file():
        raise ValueError(f"{onnx_dir} has a trimmed output vocabulary: use greedy_runner")

    model = og.Model(str(onnx_dir))
    cfg = json.loads((Path(onnx_dir) / "genai_config.json").read_text())
    eos = cfg["model"].get("eos_token_id", [])
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    outs = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        toks: list[int] = []
        while not g.is_done() and len(toks) < max_new:
            g.generate_next_token()
            t = int(g.get_next_tokens()[0])
            if t in eos_ids:
                break
            toks.append(t)
        outs.append(toks)
    return outs


def greedy_runner(onnx_dir: Path, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations decoded as the gateway serves them (:class:`OrtRunner`: a
    trimmed output vocabulary is scattered back to the full one), eos excluded."""
    import numpy as np

    from gateway.engines.onnx_batch import OrtRunner

    runner = OrtRunner(Path(onnx_dir))
    cfg = json.loads((Path(onnx_dir) / "genai_config.json").read_text())
    eos = cfg["model"].get("eos_token_id", [])
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    outs = []
    for ids in prompts:
        runner.release()
        token = int(np.argmax(runner.prefill(0, list(ids))))
        length, toks = len(ids), list[int]()
        while token not in eos_ids and len(toks) < max_new:
            toks.append(token)
            logits = runner.decode(np.asarray([token]), np.asarray([length]))
            token, length = int(np.argmax(logits[0])), length + 1
        outs.append(toks)
    return outs


def parity(torch_out: list[list[int]], onnx_out: list[list[int]]) -> Parity:
    """Share of prompts whose greedy tokens match exactly, and mean matching-prefix share."""
    exact = sum(a == b for a, b in zip(torch_out, onnx_out, strict=True))
    prefix = []
    for a, b in zip(torch_out, onnx_out, strict=True):
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        prefix.append(n / max(1, max(len(a), len(b))))
    k = max(1, len(torch_out))
    return Parity(exact=exact / k, prefix=sum(prefix) / k)


def export_stage(
    model_dir: Path,
    run_dir: Path,
    config: ExportConfig,
    prompts: Sequence[list[dict[str, str]]],
    train: Sequence[dict[str, Any]] = (),
    *,
    train_fingerprint: str | None = None,
) -> ExportResult:
    """Export ``model_dir`` into ``run_dir/export/onnx`` and check greedy parity; with
    ``output_vocab: trimmed``, keep the tokens of ``train``'s completions (the teacher's
    answers) in the LM head."""
    if config.output_vocab == "trimmed" and not train:
        raise ValueError("output_vocab: trimmed needs the train split's completions")
    stage = run_dir / "export"
    inputs: dict[str, Any] = {"model": str(model_dir), "config": config}
    if config.output_vocab == "trimmed":
        inputs["train"] = train_fingerprint
    done = stage_done(stage, inputs, ExportResult)
    if done is not None:
        return done
    stage.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx_dir = build_onnx(model_dir, stage / "onnx", config.precision, log=stage / "builder.log")
    build_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sample = [chat_ids(tokenizer, m) for m in prompts[: config.parity_prompts]]
    torch_out = greedy_torch(model_dir, sample, config.parity_tokens)
    onnx_out = greedy_onnx(onnx_dir, sample, config.parity_tokens)
    trim = None
    if config.output_vocab == "trimmed":
        trim = _trim(onnx_dir, model_dir, tokenizer, train, config, sample)
    result = ExportResult(
        onnx=str(onnx_dir),
        precision=config.precision,
        build_seconds=round(build_s, 2),
        size_bytes=sum(p.stat().st_size for p in onnx_dir.rglob("*") if p.is_file()),
        parity=parity(torch_out, onnx_out),
        parity_samples=[
            {"torch": str(tokenizer.decode(a)), "onnx": str(tokenizer.decode(b))}
            for a, b in zip(torch_out[:3], onnx_out[:3], strict=False)
        ],
        vocab=trim,
    )
    write_stage(stage, inputs, result)
    return result


def _trim(
    onnx_dir: Path,
    model_dir: Path,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    config: ExportConfig,
    sample: Sequence[list[int]],
) -> VocabTrim:
    from distill.vocab import kept_ids, special_ids, trim_lm_head

    size = int(json.loads((onnx_dir / "genai_config.json").read_text())["model"]["vocab_size"])
    ids = kept_ids(
        tokenizer,
        train,
        size,
        extra=config.output_vocab_extra,
        specials=special_ids(tokenizer, onnx_dir, model_dir),
    )
    before = greedy_runner(onnx_dir, sample, config.parity_tokens)
    kept = trim_lm_head(onnx_dir, ids, size)
    after = greedy_runner(onnx_dir, sample, config.parity_tokens)
    return VocabTrim(kept=kept, vocab_size=size, parity=parity(before, after))
