"""Decode step time, full against trimmed output vocabulary (``python -m distill.vocab_bench
ONNX_DIR``): the exported student is copied, its LM head trimmed (:mod:`distill.vocab`: the
special tokens and ids ``0 .. extra-1``), and both are decoded by the serving runner
(:class:`~gateway.engines.onnx_batch.OrtRunner`, scatter back to the full vocabulary
included) at each row count, alternating full and trimmed, several repetitions.

Prints a Markdown table of median milliseconds per decode step and rows x steps per second;
writes ``.bench/vocab_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "step_ms"]


def step_ms(runner: Any, rows: int, steps: int, prompt: int = 32) -> float:
    """Median milliseconds of ``steps`` decode steps of ``rows`` rows after a ``prompt``-token
    prefill of each row (the first step is not timed)."""
    import numpy as np

    runner.release()
    for row in range(rows):
        runner.prefill(row, [100 + (row + i) % 500 for i in range(prompt)])
    lengths = np.full(rows, prompt, np.int64)
    tokens = np.full(rows, 42, np.int64)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        runner.decode(tokens, lengths)
        if i:
            times.append((time.perf_counter() - t0) * 1000)
        lengths += 1
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from distill.vocab import kept_ids, special_ids, trim_lm_head
    from gateway.engines.onnx_batch import OrtRunner

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("onnx", type=Path, help="an exported student's onnx folder")
    ap.add_argument("--extra", type=int, default=2048, help="lowest ids kept (K ~ this)")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    size = int(json.loads((args.onnx / "genai_config.json").read_text())["model"]["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        trimmed = Path(shutil.copytree(args.onnx, Path(tmp) / "onnx"))
        tok = AutoTokenizer.from_pretrained(str(args.onnx))
        ids = kept_ids(tok, [], size, extra=args.extra, specials=special_ids(tok, args.onnx))
        kept = trim_lm_head(trimmed, ids, size)
        runners = {
            "full": OrtRunner(args.onnx, threads=args.threads),
            "trimmed": OrtRunner(trimmed, threads=args.threads),
        }
        ms: dict[str, dict[int, list[float]]] = {k: {r: [] for r in rows} for k in runners}
        for _ in range(args.reps):
            for r in rows:
                for name, runner in runners.items():
                    ms[name][r].append(step_ms(runner, r, args.steps))
    load = os.getloadavg()
    medians = {k: {r: statistics.median(v) for r, v in d.items()} for k, d in ms.items()}
    result = {
        "onnx": str(args.onnx),
        "vocab_size": size,
        "kept": kept,
        "load_avg": [round(x, 2) for x in load],
        "ms_per_step": medians,
    }
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "vocab_bench.json").write_text(json.dumps(result, indent=2))
    print(f"K = {kept} of {size}; load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print("| rows | full ms/step | trimmed ms/step | full tok/s | trimmed tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        f, t = medians["full"][r], medians["trimmed"][r]
        print(
            f"| {r} | {f:.1f} | {t:.1f} | {r * 1000 / f:.0f} | {r * 1000 / t:.0f} | {f / t:.2f}x |"
        )


if __name__ == "__main__":
    main()
