"""vLLM offline batch generation in its own process: relabelling and teacher speed.

``python -m distill.vllm_worker SPEC.json OUT.json``. The spec holds ``model`` (a merged
teacher folder), ``prompts`` (each ``{"messages": [...]}`` or ``{"prompt": "..."}``),
``max_tokens`` and ``mode``: ``batch`` generates all prompts at once (greedy) and writes
their completions; ``speed`` generates them one at a time (single stream, ``ignore_eos``)
and writes tokens/s and latencies. A ``batch`` spec may also hold ``speed: {prompts,
max_tokens}``: the same engine then times those prompts afterwards (``out["speed"]``), so
relabelling and timing the teacher share one start. Runs in a subprocess so that vLLM's
engine, its worker processes and its memory are gone when it exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _render(tokenizer: Any, item: dict[str, Any]) -> str:
    if item.get("messages"):
        return str(
            tokenizer.apply_chat_template(
                item["messages"], add_generation_prompt=True, tokenize=False
            )
        )
    return str(item.get("prompt") or "")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    max_len = min(int(config.get("max_position_embeddings", 2048)), spec.get("max_model_len", 2048))
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        max_model_len=max_len,
        seed=0,
        enforce_eager=spec.get("enforce_eager", False),
    )
    startup = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    texts = [_render(tokenizer, p) for p in spec["prompts"]]
    out: dict[str, Any] = {"startup_seconds": round(startup, 2)}
    if spec.get("mode", "batch") == "batch":
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
        t1 = time.perf_counter()
        results = llm.generate(texts, params, use_tqdm=False)
        out["completions"] = [r.outputs[0].text for r in results]
        out["finish_reasons"] = [r.outputs[0].finish_reason for r in results]
        out["tokens"] = sum(len(r.outputs[0].token_ids) for r in results)
        out["seconds"] = round(time.perf_counter() - t1, 3)
        if spec.get("speed"):
            timed = [_render(tokenizer, p) for p in spec["speed"]["prompts"]]
            out["speed"] = _speed(llm, timed, spec["speed"]["max_tokens"])
    else:
        out.update(_speed(llm, texts, spec["max_tokens"]))
    Path(args[1]).write_text(json.dumps(out))
    return 0


def _speed(llm: Any, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Single-stream timing: each prompt alone, exactly ``max_tokens`` (``ignore_eos``)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(texts[:1], params, use_tqdm=False)  # warm-up
    latencies, tokens = [], 0
    for text in texts:
        t1 = time.perf_counter()
        r = llm.generate([text], params, use_tqdm=False)[0]
        latencies.append(time.perf_counter() - t1)
        tokens += len(r.outputs[0].token_ids)
    return {"latencies": latencies, "tokens": tokens, "tokens_per_s": tokens / sum(latencies)}


if __name__ == "__main__":
    raise SystemExit(main())
