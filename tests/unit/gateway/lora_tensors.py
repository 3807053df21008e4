"""Random LoRA tensors shaped as vLLM-CPU allocates them, and a per-row reference, shared by
the fast LoRA ops' tests (``test_lora_ops.py``) and the opaque ops' (``test_lora_opaque.py``)."""

from __future__ import annotations

from typing import Any

import torch

SLOTS = 8  # max_loras
RANK = 16
HIDDEN, MLP = 64, 96
VOCAB = 200
# The model's LoRA-wrapped linears: (input, output slices): qkv, o, gate_up, down.
LINEARS = [(HIDDEN, (64, 16, 16)), (HIDDEN, (HIDDEN,)), (HIDDEN, (MLP, MLP)), (MLP, (HIDDEN,))]


def stacked(gen: Any, n_in: int, outs: tuple[int, ...], live: set[int]) -> tuple[Any, Any]:
    """LoRA A and B stacks as vLLM allocates them; slots not in ``live`` stay zero."""
    a = tuple(torch.zeros(SLOTS, 1, RANK, n_in) for _ in outs)
    b = tuple(torch.zeros(SLOTS, 1, o, RANK) for o in outs)
    for s in live:
        for i, o in enumerate(outs):
            a[i][s, 0] = torch.randn(RANK, n_in, generator=gen) * 0.1
            b[i][s, 0] = torch.randn(o, RANK, generator=gen) * 0.1
    return a, b


def reference(y: Any, x: Any, a: Any, b: Any, ids: list[int], offsets: list[int]) -> Any:
    """Per row: y[t] += (x[t] @ A[s]^T) @ B[s]^T in its slot, nothing for the base model."""
    y = y.clone()
    for t, lid in enumerate(ids):
        if lid == 0:
            continue
        for i, off in enumerate(offsets):
            h = x[t] @ a[i][lid - 1, 0].T
            d = h @ b[i][lid - 1, 0].T
            y[t, off : off + d.numel()] += d
    return y


MIXED_8 = [1, 0, 2, 3, 0, 4, 5, 6, 7, 2, 1, 0]  # 7 slots and base rows, decode-sized
MIXED_LONG = [3] * 40 + [0] * 30 + [5] * 50 + [1] * 7  # prefill-sized: per-slot loop
