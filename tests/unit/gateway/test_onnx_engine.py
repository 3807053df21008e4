"""OnnxEngine on a real exported tiny student (2 layers, hidden 64; exported in seconds)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from distill.export import greedy_onnx
from gateway.engines.base import (
    AdapterEngine,
    Engine,
    GenerateRequest,
    InvalidInputError,
    PromptTooLongError,
    Sampling,
)
from gateway.engines.onnx import OnnxEngine
from tests import waits

pytest.importorskip("onnxruntime_genai")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
async def engine(tiny_onnx: Path) -> AsyncIterator[OnnxEngine]:
    eng = await OnnxEngine.load(tiny_onnx, model_name="tiny-student", max_model_len=128)
    yield eng
    await eng.close()


async def _collect(engine: OnnxEngine, request: GenerateRequest) -> tuple[str, list]:
    chunks = [c async for c in engine.generate(request)]
    return "".join(c.text for c in chunks), chunks


def test_protocol(engine: OnnxEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.model_name == "tiny-student"
    assert engine.max_model_len == 128
    assert engine.ready()
    assert not engine.dead()
    assert not isinstance(engine, AdapterEngine)  # students take no adapters


async def test_greedy_matches_direct_generation(engine: OnnxEngine, tiny_onnx: Path) -> None:
    req = GenerateRequest("r1", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=12))
    text, chunks = await _collect(engine, req)
    ids = engine.encode(req)
    direct = greedy_onnx(tiny_onnx, [ids], 12)[0]
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].prompt_tokens == len(ids)
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts)
    if chunks[-1].finish_reason == "length":
        assert chunks[-1].completion_tokens == 12
        assert len(direct) == 12
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_onnx))
    assert text == tok.decode(direct)
    # deterministic
    again, _ = await _collect(engine, req)
    assert again == text


async def test_ignore_eos_generates_exactly_max_tokens(engine: OnnxEngine, tiny_onnx: Path) -> None:
    """Speed measurements force the length (as vLLM's ``ignore_eos``): with the first greedy
    token made an end token, a normal request stops at once and an ignore_eos one does not."""

    def req(ignore: bool) -> GenerateRequest:
        sampling = Sampling(temperature=0, max_tokens=10, ignore_eos=ignore)
        return GenerateRequest("r-eos", messages=MESSAGES, sampling=sampling)

    first = greedy_onnx(tiny_onnx, [engine.encode(req(False))], 1)[0][0]
    engine._eos.add(first)
    _, stopped = await _collect(engine, req(False))
    assert stopped[-1].finish_reason == "stop"
    assert stopped[-1].completion_tokens <= 1
    _, forced = await _collect(engine, req(True))
    assert forced[-1].finish_reason == "length"
    assert forced[-1].completion_tokens == 10


async def test_completion_prompt_and_token_ids(engine: OnnxEngine) -> None:
    text_req = GenerateRequest(
        "r", prompt="Ahoy! The capital", sampling=Sampling(temperature=0, max_tokens=5)
    )
    text, chunks = await _collect(engine, text_req)
    ids = engine.encode(text_req)
    id_req = GenerateRequest("r", prompt=ids, sampling=Sampling(temperature=0, max_tokens=5))
    text2, _ = await _collect(engine, id_req)
    assert text == text2
    assert chunks[-1].completion_tokens <= 5


async def test_stop_strings(engine: OnnxEngine) -> None:
    base = GenerateRequest("r", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=16))
    full, _ = await _collect(engine, base)
    assert len(full) >= 4
    stop = full[2:4]
    req = GenerateRequest(
        "r", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=16, stop=[stop])
    )
    text, chunks = await _collect(engine, req)
    assert text == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"


async def test_sampling_with_seed_is_reproducible(engine: OnnxEngine) -> None:
    s = Sampling(temperature=1.5, top_p=0.9, seed=7, max_tokens=10)
    a, _ = await _collect(engine, GenerateRequest("a", messages=MESSAGES, sampling=s))
    b, _ = await _collect(engine, GenerateRequest("b", messages=MESSAGES, sampling=s))
    assert a == b


async def test_n_choices(engine: OnnxEngine) -> None:
    s = Sampling(n=2, temperature=0, max_tokens=4)
    chunks = [c async for c in engine.generate(GenerateRequest("r", messages=MESSAGES, sampling=s))]
    assert {c.index for c in chunks} == {0, 1}
    finals = [c for c in chunks if c.finish_reason]
    assert len(finals) == 2


async def test_concurrent_requests(engine: OnnxEngine) -> None:
    req = GenerateRequest("r", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=8))
    want, _ = await _collect(engine, req)
    results = await asyncio.gather(*(_collect(engine, req) for _ in range(8)))
    assert all(text == want for text, _ in results)


async def test_early_close_stops_generation(engine: OnnxEngine) -> None:
    req = GenerateRequest("r", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=100))
    gen = engine.generate(req)
    first = await gen.__anext__()
    assert first.completion_tokens >= 1
    await gen.aclose()  # type: ignore[attr-defined]
    await waits.until(lambda: engine.inflight == 0)


async def test_rejections(engine: OnnxEngine) -> None:
    with pytest.raises(PromptTooLongError):
        await _collect(engine, GenerateRequest("r", prompt=[5] * 200))
    with pytest.raises(InvalidInputError):
        await _collect(engine, GenerateRequest("r", prompt="hi", adapter="pirate"))
    with pytest.raises(InvalidInputError):
        await _collect(engine, GenerateRequest("r", prompt=[10**9]))


async def test_budget_capped_by_context(engine: OnnxEngine) -> None:
    ids = [5] * 120
    _, chunks = await _collect(
        engine, GenerateRequest("r", prompt=ids, sampling=Sampling(temperature=0, max_tokens=50))
    )
    assert chunks[-1].completion_tokens <= 8


async def test_close(tiny_onnx: Path) -> None:
    eng = OnnxEngine(tiny_onnx)
    assert eng.model_name == tiny_onnx.parent.name  # an "onnx" folder takes its parent's name
    await eng.close()
    assert not eng.ready()
