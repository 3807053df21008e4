"""LoRA's cost per engine step on vLLM-CPU, vLLM's ops against Retort's, without an engine
(``python -m loadtest.lora_kernels``).

The shapes of the default model (SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 3 KV heads,
vocabulary 49152), rank 16 and 8 slots as the default settings. Every LoRA-wrapped linear
(qkv, o, gate_up, down) and the lm_head's LoRA (``add_lora_logits``, run for every step) go
through a punica wrapper exactly as vLLM's layers call it, after ``update_metadata`` with the
mapping vLLM 0.32's V1 runner builds (``is_prefill=True`` for every step, so the CPU wrapper
takes its ``sgmv`` path, which skips the math only when no token has an adapter):

- ``vllm``: vLLM's ``PunicaWrapperCPU`` (``vllm.lora.ops.torch_ops``);
- ``fast``: :class:`gateway.engines.lora_ops.FastPunicaWrapperCPU` (the plugin's);
- ``base``: the base model's own matmuls for the same tokens (linears and lm_head).

Token mixes: base-model tokens only (slot -1), one adapter, 8 distinct adapters on all
modules, and 8 distinct adapters on q_proj/v_proj only (what ``retort adapters train`` and
the adapters benchmark make). One thread, so other load on a shared machine distorts less.
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

HIDDEN, MLP, LAYERS, VOCAB, SLOTS = 576, 1536, 30, 49152, 8
# (input, output slices, the adapter modules behind each slice)
LINEARS: list[tuple[int, tuple[int, ...], tuple[str, ...]]] = [
    (HIDDEN, (576, 192, 192), ("q_proj", "k_proj", "v_proj")),
    (HIDDEN, (576,), ("o_proj",)),
    (HIDDEN, (MLP, MLP), ("gate_proj", "up_proj")),
    (MLP, (HIDDEN,), ("down_proj",)),
]


def _median_ms(fn: Callable[[], None], n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _lora_step(wr: Any, a_all: Any, b_all: Any, xs: Any, ys: Any, head: Any) -> None:
    """One step's LoRA calls, as vLLM's layers make them."""
    for layer in range(LAYERS):
        for j, (i, outs, _) in enumerate(LINEARS):
            wr.add_lora_linear(ys[j], xs[i], a_all[layer][j], b_all[layer][j], 1.0, outs)
    logits, hidden_last, head_a, head_b = head
    wr.add_lora_logits(logits, hidden_last, head_a, head_b, 1.0)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", default="1,8,128", help="tokens per step, comma list")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    import torch
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from gateway.engines.lora_ops import FastPunicaWrapperCPU

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = args.rank
    w = [[torch.randn(sum(o), i) * 0.02 for i, o, _ in LINEARS] for _ in range(LAYERS)]
    lm_head = torch.randn(VOCAB, HIDDEN) * 0.02

    def stacks(targets: set[str] | None) -> tuple[Any, Any]:
        """Per layer and linear, vLLM's A and B stacks, every slot holding an adapter on
        ``targets`` (None: all modules); other modules' slots stay zero, as vLLM keeps them."""
        a_all, b_all = [], []
        for _ in range(LAYERS):
            a_l, b_l = [], []
            for i, outs, mods in LINEARS:
                # zero_(): vLLM's reset_lora writes the zeros, so their pages are real memory.
                a = tuple(torch.zeros(SLOTS, 1, rank, i).zero_() for _ in outs)
                b = tuple(torch.zeros(SLOTS, 1, o, rank).zero_() for o in outs)
                for k, mod in enumerate(mods):
                    if targets is None or mod in targets:
                        a[k].normal_(std=0.02)
                        b[k].normal_(std=0.02)
                a_l.append(a)
                b_l.append(b)
            a_all.append(a_l)
            b_all.append(b_l)
        return a_all, b_all

    all_modules = stacks(None)
    qv_only = stacks({"q_proj", "v_proj"})
    head_a = torch.zeros(SLOTS, 1, rank, HIDDEN).zero_()  # adapters without an lm_head LoRA
    head_b = torch.zeros(SLOTS, 1, VOCAB, rank).zero_()

    def wrapper(cls: Any, ids: list[int], slot_ids: list[int]) -> Any:
        wr = cls(4096, 256, device="cpu")
        mapping = LoRAMapping(tuple(ids), tuple(slot_ids), is_prefill=True)
        wr.update_metadata(mapping, [*range(1, SLOTS + 1)], SLOTS + 1, VOCAB)
        return wr

    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        xs = {HIDDEN: torch.randn(t, HIDDEN), MLP: torch.randn(t, MLP)}
        ys = [torch.zeros(t, sum(outs)) for _, outs, _ in LINEARS]
        seqs = min(t, 8)  # decode: one token per sequence; prefill: the last token samples
        hidden_last = torch.randn(seqs, HIDDEN)
        logits = torch.zeros(seqs, VOCAB)

        def base(xs: dict[int, Any] = xs, h: Any = hidden_last) -> None:
            for layer in range(LAYERS):
                for j, (i, _, _) in enumerate(LINEARS):
                    xs[i] @ w[layer][j].T
            h @ lm_head.T

        row: dict[str, Any] = {"tokens": t, "base ms": _median_ms(base, args.repeats)}
        mixes = {
            "base tokens": ([0] * t, all_modules),
            "one adapter": ([1] * t, all_modules),
            "8 adapters": ([1 + k % SLOTS for k in range(t)], all_modules),
            "8 adapters q/v": ([1 + k % SLOTS for k in range(t)], qv_only),
        }
        for mix, (ids, (a_all, b_all)) in mixes.items():
            # Sampled rows: one per sequence; for prefill-sized steps the sequences' adapters.
            slot_ids = ids if t <= 8 else [1 + k % SLOTS for k in range(seqs)]
            if mix in ("base tokens", "one adapter"):
                slot_ids = [ids[0]] * seqs
            for name, cls in (("vllm", PunicaWrapperCPU), ("fast", FastPunicaWrapperCPU)):
                wr = wrapper(cls, ids, slot_ids)

                step = functools.partial(
                    _lora_step, wr, a_all, b_all, xs, ys, (logits, hidden_last, head_a, head_b)
                )
                row[f"{mix}: {name} ms"] = _median_ms(step, args.repeats)
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
