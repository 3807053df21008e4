"""Opaque custom ops for the LoRA math, so vLLM-CPU can compile a model with LoRA enabled.

vLLM-CPU compiles the model with ``CompilationMode.DYNAMO_TRACE_ONCE``: Dynamo traces the
forward once, during warm-up, and drops every guard, so a Python branch taken while tracing
is frozen into the graph for good. :class:`~gateway.engines.lora_ops.FastPunicaWrapperCPU`
decides per step, in Python, which rows use which LoRA slot (its slot plan); traced, the
warm-up step's plan (usually "no adapter") would be applied to every later step.

So while Dynamo traces, the wrapper emits one of these ops instead of its Python branches
(``torch.compiler.is_compiling()``): the compiled graph holds an opaque call that mutates
the output in place (``mutates_args``), and at run time the op calls the wrapper's eager code,
which reads the current step's plan. The same pattern as vLLM's own attention ops
(``torch.ops.vllm.unified_attention*``, which read the forward context at run time).

The ops find their wrapper through a small per-process registry (:func:`register_wrapper`):
a wrapper gets the next integer, which the graph holds as a constant. The numbering is the
same in every process that builds the same model (one wrapper per model), so a graph reused
from inductor's on-disk cache finds its wrapper as well.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["lora_embedding", "lora_linear", "lora_logits", "register_wrapper", "wrapper"]

_WRAPPERS: list[weakref.ref[Any]] = []


def register_wrapper(obj: Any) -> int:
    """Number ``obj`` (a :class:`FastPunicaWrapperCPU`) for the ops; kept by a weak reference."""
    _WRAPPERS.append(weakref.ref(obj))
    return len(_WRAPPERS) - 1


def wrapper(key: int) -> Any:
    """The wrapper registered as ``key``."""
    obj = _WRAPPERS[key]() if 0 <= key < len(_WRAPPERS) else None
    if obj is None:
        raise RuntimeError(f"retort LoRA ops: no live punica wrapper number {key}")
    return obj


@torch.library.custom_op("retort::lora_linear", mutates_args=("y",))
def lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    output_slices: list[int],
    key: int,
) -> None:
    """``FastPunicaWrapperCPU.add_lora_linear`` of wrapper ``key``, in place on ``y``."""
    wrapper(key).eager_add_lora_linear(
        y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices)
    )


@lora_linear.register_fake
def _lora_linear_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    output_slices: list[int],
    key: int,
) -> None:
    return None


@torch.library.custom_op("retort::lora_embedding", mutates_args=("y",))
def lora_embedding(
    y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, key: int
) -> None:
    """``FastPunicaWrapperCPU.add_lora_embedding`` of wrapper ``key``, in place on ``y``."""
    wrapper(key).eager_add_lora_embedding(y, x, lora_b, add_inputs)


@lora_embedding.register_fake
def _lora_embedding_fake(
    y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, key: int
) -> None:
    return None


@torch.library.custom_op("retort::lora_logits", mutates_args=("y",))
def lora_logits(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    key: int,
) -> None:
    """``FastPunicaWrapperCPU.add_lora_logits`` of wrapper ``key``, in place on ``y``."""
    wrapper(key).eager_add_lora_logits(y, x, lora_a, lora_b, scale)


@lora_logits.register_fake
def _lora_logits_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    key: int,
) -> None:
    return None
