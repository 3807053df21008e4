"""OnnxEngine serving a student whose output vocabulary was trimmed (distill/vocab.py): the
logits are scattered back to the full vocabulary, tokens outside the kept set get
probability 0, and sampling, logprobs, logit_bias and grammars keep working."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from distill.export import greedy_onnx, greedy_runner
from distill.vocab import trim_lm_head
from gateway.engines.base import (
    EngineError,
    GenerateRequest,
    InvalidInputError,
    OutputConstraint,
    Sampling,
)
from gateway.engines.onnx import OnnxEngine

pytest.importorskip("onnxruntime_genai")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def trimmed(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """The tiny student trimmed to its own greedy answer's tokens (and its end token)."""
    out = Path(shutil.copytree(tiny_onnx, tmp_path_factory.mktemp("trim") / "onnx"))
    engine = OnnxEngine(tiny_onnx, max_model_len=128)
    try:
        prompt = engine.encode(GenerateRequest("p", messages=MESSAGES))
    finally:
        engine.batcher.close()
    model = json.loads((out / "genai_config.json").read_text())["model"]
    answer = greedy_runner(tiny_onnx, [prompt], 12)[0]
    eos = model["eos_token_id"]
    ids = sorted({*answer, *(eos if isinstance(eos, list) else [eos])})
    trim_lm_head(out, ids, int(model["vocab_size"]))
    return out, ids


@pytest.fixture
async def engines(tiny_onnx: Path, trimmed: tuple[Path, list[int]]) -> AsyncIterator[tuple]:
    full = await OnnxEngine.load(tiny_onnx, max_model_len=128)
    cut = await OnnxEngine.load(trimmed[0], max_model_len=128)
    yield full, cut
    await full.close()
    await cut.close()


async def _run(engine: OnnxEngine, **sampling: object) -> tuple[str, list]:
    req = GenerateRequest("r", messages=MESSAGES, sampling=Sampling(max_tokens=12, **sampling))
    chunks = [c async for c in engine.generate(req)]
    return "".join(c.text for c in chunks), chunks


async def test_trimmed_student_serves_the_same_greedy_text(engines: tuple) -> None:
    full, cut = engines
    assert await _run(cut, temperature=0) == await _run(full, temperature=0)


async def test_tokens_outside_the_kept_set_have_probability_zero(
    engines: tuple, trimmed: tuple[Path, list[int]]
) -> None:
    full, cut = engines
    ids = trimmed[1]
    kept = {cut._piece(t) for t in ids}
    _, chunks = await _run(cut, temperature=0, logprobs=50)
    for c in chunks:
        for lp in c.logprobs or []:
            assert math.isfinite(lp.logprob)
            finite = [(tok, p) for tok, p in lp.top if math.isfinite(p)]
            assert {tok for tok, _ in finite} <= kept
            assert len(finite) <= len(ids)
            assert math.isclose(sum(math.exp(p) for _, p in finite), 1.0, rel_tol=1e-4)
    # Sampling at a high temperature never leaves the kept set.
    outside = next(t for t in range(300) if t not in ids)
    _, chunks = await _run(cut, temperature=5.0, seed=1, logprobs=0)
    sampled = [lp.token for c in chunks for lp in c.logprobs or []]
    assert sampled
    assert set(sampled) <= kept
    # A positive bias on a token it can never produce is refused, not silently dropped; a
    # negative one already holds.
    with pytest.raises(InvalidInputError, match=f"token id {outside} can never be produced"):
        await _run(cut, temperature=5.0, seed=1, logit_bias={outside: 100}, logprobs=0)
    _, chunks = await _run(cut, temperature=0, logit_bias={outside: -100})
    assert "".join(c.text for c in chunks)
    # The full model does produce it under that bias.
    _, chunks = await _run(full, temperature=5.0, seed=1, logit_bias={outside: 100}, logprobs=0)
    assert {lp.token for c in chunks for lp in c.logprobs or []} == {full._piece(outside)}


async def test_a_grammar_the_kept_tokens_cannot_spell_is_a_clear_400(engines: tuple) -> None:
    """The request asks for output the student cannot write: invalid input (HTTP 400 that
    says to send it to the teacher), not an engine failure (500)."""
    _, cut = engines
    with pytest.raises(InvalidInputError, match="holds none of the tokens the requested"):
        await _run(cut, temperature=0, constraint=OutputConstraint({"type": "integer"}))


def test_a_map_for_another_vocabulary_is_refused(
    trimmed: tuple[Path, list[int]], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(trimmed[0], tmp_path / "onnx"))
    size = json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"]
    (out / "vocab_map.json").write_text(json.dumps({"vocab_size": size + 1, "ids": trimmed[1]}))
    with pytest.raises(EngineError, match=f"map is for {size + 1} tokens"):
        OnnxEngine(out, max_model_len=128)
    with pytest.raises(ValueError, match="trimmed output vocabulary"):
        greedy_onnx(out, [[5, 6]], 2)
