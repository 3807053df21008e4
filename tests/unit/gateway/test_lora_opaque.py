"""The opaque LoRA custom ops (``engine.lora_compile``): the op path gives what the eager fast
wrapper gives, and a module that calls the wrapper, compiled once with every guard dropped
(as vLLM-CPU's ``DYNAMO_TRACE_ONCE`` does), keeps giving the eager results when the step's
slot mix changes; without the ops the same compiled module is wrong (the frozen branch)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402

from gateway.engines import lora_opaque  # noqa: E402
from gateway.engines.lora_ops import FastPunicaWrapperCPU  # noqa: E402
from tests.unit.gateway.lora_tensors import (  # noqa: E402
    HIDDEN,
    LINEARS,
    MIXED_8,
    MIXED_LONG,
    RANK,
    SLOTS,
    VOCAB,
    reference,
    stacked,
)

ONE = [2] * 6
MIXES = {
    "all-base": [0] * 5,
    "one-adapter": ONE,
    "one-adapter-and-base": [0, 3, 0, 3],
    "mixed-decode": MIXED_8,
    "mixed-prefill": MIXED_LONG,
}


def fast(ids: list[int], *, prefill: bool = True) -> Any:
    w = FastPunicaWrapperCPU(256, 256, device="cpu")
    point(w, ids, prefill=prefill)
    return w


def point(w: Any, ids: list[int], *, prefill: bool = True) -> None:
    """A new step: each token's adapter id (0: base model, ``k``: slot ``k - 1``)."""
    w.update_metadata(
        LoRAMapping(tuple(ids), tuple(ids), is_prefill=prefill),
        [*range(1, SLOTS + 1)],
        SLOTS + 1,
        VOCAB,
    )


@pytest.mark.parametrize("ids", list(MIXES.values()), ids=list(MIXES))
def test_the_linear_op_equals_the_eager_wrapper(ids: list[int]) -> None:
    w = fast(ids)
    gen = torch.Generator().manual_seed(len(ids))
    for n_in, outs in LINEARS:
        a, b = stacked(gen, n_in, outs, set(range(SLOTS - 1)))
        x = torch.randn(len(ids), n_in, generator=gen)
        y0 = torch.randn(len(ids), sum(outs), generator=gen)
        want, got = y0.clone(), y0.clone()
        w.add_lora_linear(want, x, a, b, 1.0, outs)
        torch.ops.retort.lora_linear(got, x, list(a), list(b), 1.0, list(outs), w._key)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        torch.testing.assert_close(got, reference(y0, x, a, b, ids, offsets))


@pytest.mark.parametrize("ids", [[0, 0, 0], ONE, [1, 0, 3, 3, 2]], ids=["base", "one", "mixed"])
def test_the_logits_and_embedding_ops_equal_the_eager_wrapper(ids: list[int]) -> None:
    w = fast(ids)
    gen = torch.Generator().manual_seed(13)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen) * 0.1
    b = torch.randn(SLOTS, 1, VOCAB, RANK, generator=gen) * 0.1
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    y0 = torch.randn(len(ids), VOCAB + 8, generator=gen)
    want, got = y0.clone(), y0.clone()
    w.add_lora_logits(want, x, a, b, 0.5)
    torch.ops.retort.lora_logits(got, x, a, b, 0.5, w._key)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    h = torch.randn(len(ids), RANK, generator=gen)
    eb = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=gen)
    emb0 = torch.randn(len(ids), HIDDEN, generator=gen)
    want, got = emb0.clone(), emb0.clone()
    w.add_lora_embedding(want, h, eb, add_inputs=True)
    torch.ops.retort.lora_embedding(got, h, eb, True, w._key)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if any(ids):
        assert not torch.equal(got, emb0)


def test_the_ops_pass_torchs_opcheck() -> None:
    """Schema (``y`` is the only tensor mutated), fake implementation, functionalization."""
    ids = [1, 0, 2, 2]
    w = fast(ids)
    gen = torch.Generator().manual_seed(2)
    n_in, outs = LINEARS[0]
    a, b = stacked(gen, n_in, outs, {0, 1})
    x = torch.randn(len(ids), n_in, generator=gen)
    y = torch.randn(len(ids), sum(outs), generator=gen)
    torch.library.opcheck(
        torch.ops.retort.lora_linear.default,
        (y, x, list(a), list(b), 1.0, list(outs), w._key),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_a_dead_wrapper_is_an_error_not_a_silent_skip() -> None:
    key = fast([1])._key
    gc.collect()
    with pytest.raises(RuntimeError, match="no live punica wrapper"):
        lora_opaque.wrapper(key)
    with pytest.raises(RuntimeError, match="no live punica wrapper"):
        lora_opaque.wrapper(-1)


class TinyLoRAModel(nn.Module):
    """The LoRA-wrapped linears of a model (qkv, o, gate_up, down), each doing what vLLM's
    ``BaseLinearLayerWithLoRA._apply_lora_to_output`` does: base matmul, then the wrapper's
    ``add_lora_linear`` on the output in place."""

    def __init__(self, w: Any, gen: Any) -> None:
        super().__init__()
        self.punica_wrapper = w
        self.layers: list[tuple[Any, Any, Any, tuple[int, ...]]] = []
        for n_in, outs in LINEARS:
            a, b = stacked(gen, n_in, outs, set(range(SLOTS - 1)))
            weight = torch.randn(sum(outs), n_in, generator=gen) * 0.1
            self.layers.append((weight, a, b, outs))

    def forward(self, x: Any) -> Any:
        ys = []
        for weight, a, b, outs in self.layers:
            h = x if weight.size(1) == x.size(1) else ys[-1][:, : weight.size(1)]
            y = torch.nn.functional.linear(h, weight)
            self.punica_wrapper.add_lora_linear(y, h, a, b, 1.0, outs)
            ys.append(torch.relu(y) + 1)
        return torch.cat(ys, dim=1)


def trace_once(backend: str) -> Callable[[Any], Any]:
    """torch.compile as vLLM-CPU's DYNAMO_TRACE_ONCE: full graph, every guard dropped."""
    counter = CompileCounterWithBackend(backend)
    graphs: list[str] = []

    def record(gm: Any, inputs: Any) -> Any:
        graphs.append(gm.code)
        return counter(gm, inputs)

    def compiled(module: Any) -> Any:
        fn = torch.compile(
            module,
            backend=record,
            dynamic=True,
            fullgraph=True,
            options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )
        fn.counter = counter
        fn.graphs = graphs
        return fn

    return compiled


STEPS = [[0] * 4, MIXED_8, ONE, [0, 3, 0, 3, 0, 0, 0], MIXED_LONG, [0] * 9, [5, 1] * 20]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_once_it_follows_every_later_slot_mix(backend: str) -> None:
    """Traced on a base-only step (as vLLM's warm-up is), then run on other mixes and sizes:
    the compiled module equals the eager one every time, and it was traced once."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(21)
    w = fast(STEPS[0])
    model = TinyLoRAModel(w, gen)
    compiled = trace_once(backend)(model)
    for ids in STEPS:
        point(w, ids, prefill=len(ids) > 8)
        x = torch.randn(len(ids), HIDDEN, generator=gen)
        want = model(x)
        got = compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {ids}")
    # A slot rewritten in place (vLLM's set_lora loading another adapter) counts at once.
    point(w, MIXED_8)
    x = torch.randn(len(MIXED_8), HIDDEN, generator=gen)
    before = compiled(x)
    for _, a, b, _ in model.layers:
        for t in (*a, *b):
            t[1].copy_(torch.randn(t[1].shape, generator=gen) * 0.1)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(compiled(x), before)
    assert compiled.counter.frame_count == 1
    assert compiled.graphs[0].count("torch.ops.retort.lora_linear") == len(LINEARS)


def test_without_the_ops_the_compiled_module_freezes_the_warmup_branch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the wrapper's eager code traced directly keeps the warm-up step's
    "no adapter" branch, so later adapter steps silently get the base model's output."""
    monkeypatch.setattr(
        FastPunicaWrapperCPU, "add_lora_linear", FastPunicaWrapperCPU.eager_add_lora_linear
    )
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(21)
    w = fast(STEPS[0])
    model = TinyLoRAModel(w, gen)
    compiled = trace_once("aot_eager")(model)
    x = torch.randn(4, HIDDEN, generator=gen)
    torch.testing.assert_close(compiled(x), model(x))
    point(w, ONE[:4])
    with_adapter = model(x)
    frozen = compiled(x)
    point(w, [0] * 4)
    torch.testing.assert_close(frozen, model(x))  # the base model's output
    assert not torch.allclose(frozen, with_adapter)


def test_untraceable_ops_stop_the_trace() -> None:
    """add_shrink/add_expand (fully sharded LoRA) have no opaque op: a trace through one fails
    loudly instead of freezing its branches."""
    w = fast([1, 0])

    def f(x: Any) -> Any:
        buf = torch.zeros(1, x.size(0), RANK)
        w.add_shrink(buf, x, (torch.zeros(SLOTS, 1, RANK, HIDDEN),), 1.0)
        return buf

    fn = torch.compile(f, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="lora_compile"):
        fn(torch.randn(2, HIDDEN))


def test_the_embedding_layers_call_compiles_and_follows_the_mix() -> None:
    """What vLLM's ``VocabParallelEmbeddingWithLoRA.forward`` does under compile: its
    ``add_lora_embedding(..., add_input=True)`` (a keyword vLLM's CPU wrapper ignores) traces
    as the opaque op and follows later steps."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    w = fast([0] * 4)
    eb = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=gen)

    def embed(h: Any, base: Any) -> Any:
        y = base * 2
        w.add_lora_embedding(y, h, eb, add_input=True)
        return y

    compiled = trace_once("aot_eager")(embed)
    for ids in ([0] * 4, MIXED_8, ONE):
        point(w, ids)
        h = torch.randn(len(ids), RANK, generator=gen)
        base = torch.randn(len(ids), HIDDEN, generator=gen)
        torch.testing.assert_close(compiled(h, base), embed(h, base))
    assert compiled.counter.frame_count == 1
    assert "torch.ops.retort.lora_embedding" in compiled.graphs[0]
