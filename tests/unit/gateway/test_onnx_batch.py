"""The students' continuous batcher on a real exported tiny student: scheduling (FIFO
admission, lockstep steps), cancellation mid-batch, ``n`` > 1 in a batch, the bounded queue.

Sampled sequences (temperature 1, seeded) are the cross-check: each row samples from its own
logits with its own generator, so a row whose cache were disturbed by its neighbours joining,
leaving or moving would sample different tokens than when it runs alone.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from gateway.engines.base import EngineOverloadedError, GenerateRequest, Sampling
from gateway.engines.onnx import OnnxEngine
from gateway.engines.onnx_batch import Batcher, OrtRunner, QueueFullError, Sequence, sample_token
from gateway.errors import to_api_error

pytest.importorskip("onnxruntime_genai")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40, 41]]


class Log:
    """Records what the batcher hands out, per sequence tag, with the step it came at."""

    def __init__(self, batcher_ref: list[Batcher]) -> None:
        self.ref = batcher_ref
        self.tokens: dict[object, list[int]] = {}
        self.steps: dict[object, list[int]] = {}
        self.finish: dict[object, str] = {}
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self.expect = 0

    def emit(self, seq: Sequence, token: int | None, finish: str | None) -> None:
        if token is not None:
            self.tokens.setdefault(seq.tag, []).append(token)
            self.steps.setdefault(seq.tag, []).append(self.ref[0].steps)
        if finish is not None:
            self.finish[seq.tag] = finish
            if len(self.finish) >= self.expect:
                self.done.set()

    def fail(self, seq: Sequence, exc: BaseException) -> None:
        self.errors.append(exc)
        self.done.set()


def _batcher(tiny_onnx: Path, **kwargs: int) -> tuple[Batcher, Log]:
    ref: list[Batcher] = []
    log = Log(ref)
    batcher = Batcher(OrtRunner(tiny_onnx), eos={2}, vocab=400, **kwargs)
    ref.append(batcher)
    return batcher, log


def _seq(log: Log, tag: object, ids: list[int], budget: int, seed: int) -> Sequence:
    return Sequence(
        ids, budget, log.emit, log.fail, temperature=1.0, seed=seed, ignore_eos=True, tag=tag
    )


def _alone(tiny_onnx: Path, ids: list[int], budget: int, seed: int) -> list[int]:
    batcher, log = _batcher(tiny_onnx, max_batch=1)
    log.expect = 1
    try:
        batcher.submit([_seq(log, "x", ids, budget, seed)])
        assert log.done.wait(30)
    finally:
        batcher.close()
    return log.tokens["x"]


def test_fifo_admission_and_lockstep(tiny_onnx: Path) -> None:
    """Two rows, four sequences: the first two run together, one token each per step; the
    others join in arrival order as rows free up; every sequence samples what it samples
    alone."""
    batcher, log = _batcher(tiny_onnx, max_batch=2)
    log.expect = 4
    budgets = [6, 12, 6, 6]
    try:
        batcher.submit(
            [
                _seq(log, i, p, b, seed=i)
                for i, (p, b) in enumerate(zip(PROMPTS, budgets, strict=True))
            ]
        )
        assert log.done.wait(60)
    finally:
        batcher.close()
    assert not log.errors
    assert batcher.max_rows_seen == 2
    firsts = [log.steps[i][0] for i in range(4)]
    assert firsts == sorted(firsts)  # FIFO
    assert firsts[0] == firsts[1]  # admitted together
    # lockstep: while 0 and 1 both run, they get a token at every step
    assert log.steps[0] == log.steps[1][:6]
    assert log.steps[0] == list(range(log.steps[0][0], log.steps[0][0] + 6))
    # 2 takes 0's row as soon as 0 ends, before 1 has finished
    assert log.steps[2][0] <= log.steps[0][-1] + 1 < log.steps[1][-1]
    for i in range(4):
        assert len(log.tokens[i]) == budgets[i]
        assert log.finish[i] == "length"
        assert log.tokens[i] == _alone(tiny_onnx, PROMPTS[i], budgets[i], seed=i)


def test_cancel_mid_batch_frees_the_row(tiny_onnx: Path) -> None:
    """A sequence cancelled mid-way stops within a step; the waiting one takes its row, and
    the neighbour (whose row may have moved) samples exactly what it samples alone."""
    batcher, log = _batcher(tiny_onnx, max_batch=2)
    log.expect = 2
    a = _seq(log, "a", PROMPTS[0], 40, seed=1)
    b = _seq(log, "b", PROMPTS[1], 20, seed=2)
    c = _seq(log, "c", PROMPTS[2], 10, seed=3)
    cancelled_at: list[int] = []

    def emit(seq: Sequence, token: int | None, finish: str | None) -> None:
        Log.emit(log, seq, token, finish)
        if len(log.tokens.get("a", [])) == 3 and not cancelled_at:
            seq.cancel()
            cancelled_at.append(batcher.steps)

    a.emit = emit
    try:
        batcher.submit([a, b, c])
        assert log.done.wait(60)
    finally:
        batcher.close()
    assert not log.errors
    assert len(log.tokens["a"]) == 3  # nothing after the cancel
    assert "a" not in log.finish
    assert log.steps["c"][0] <= cancelled_at[0] + 1  # the freed row is taken at once
    assert log.steps["c"][0] < log.steps["b"][-1]
    assert log.tokens["b"] == _alone(tiny_onnx, PROMPTS[1], 20, seed=2)
    assert log.tokens["c"] == _alone(tiny_onnx, PROMPTS[2], 10, seed=3)


def test_queue_bound(tiny_onnx: Path) -> None:
    batcher, log = _batcher(tiny_onnx, max_batch=1, max_queue=1)
    gate = threading.Event()
    try:
        slow = _seq(log, "slow", PROMPTS[0], 200, seed=0)
        slow.emit = lambda s, t, f: gate.wait(10) and None  # type: ignore[func-returns-value,assignment]
        batcher.submit([slow, _seq(log, "w", PROMPTS[1], 4, seed=0)])
        with pytest.raises(QueueFullError) as info:
            batcher.submit([_seq(log, "x", PROMPTS[2], 4, seed=0)])
        assert info.value.retry_after >= 1
        slow.cancel()
    finally:
        gate.set()
        batcher.close()


def test_sample_token() -> None:
    logits = np.asarray([0.0, 3.0, 1.0, 2.9], np.float32)
    assert sample_token(logits, 0.0, 1.0, None) == 1
    rng = np.random.default_rng(0)
    assert {sample_token(logits, 1.0, 0.01, rng) for _ in range(20)} == {1}  # nucleus of one
    a = [sample_token(logits, 1.0, 1.0, np.random.default_rng(5)) for _ in range(5)]
    b = [sample_token(logits, 1.0, 1.0, np.random.default_rng(5)) for _ in range(5)]
    assert a == b
    draws = {sample_token(logits, 1.0, 0.9, rng) for _ in range(200)}
    assert draws <= {1, 3, 2}
    assert {1, 3} <= draws


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


async def test_n_choices_run_in_one_batch(tiny_onnx: Path) -> None:
    """``n`` = 3 beside another request: the choices are rows of the same steps; each one's
    text is what it is alone with its seed (``seed + index``)."""
    eng = await OnnxEngine.load(tiny_onnx, model_name="tiny", max_model_len=128, max_concurrency=8)
    try:
        s = Sampling(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
        other = Sampling(temperature=0, max_tokens=12)

        async def collect(sampling: Sampling) -> dict[int, str]:
            texts: dict[int, str] = {}
            req = GenerateRequest("r", messages=MESSAGES, sampling=sampling)
            async for c in eng.generate(req):
                texts[c.index] = texts.get(c.index, "") + c.text
            return texts

        together, _ = await asyncio.gather(collect(s), collect(other))
        assert eng.batcher.max_rows_seen >= 3
        assert set(together) == {0, 1, 2}
        for i in range(3):
            alone = await collect(
                Sampling(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True)
            )
            assert together[i] == alone[0]
    finally:
        await eng.close()


async def test_min_tokens_and_overload(tiny_onnx: Path) -> None:
    eng = await OnnxEngine.load(
        tiny_onnx, model_name="tiny", max_model_len=128, max_concurrency=1, max_queue=0
    )
    try:
        req = GenerateRequest(
            "r", messages=MESSAGES, sampling=Sampling(temperature=0, max_tokens=1)
        )
        first = eng.encode(req)
        chunks = [c async for c in eng.generate(req)]
        # make the first greedy token an end token: min_tokens keeps it out until then
        tok = OrtRunner(tiny_onnx).prefill(0, first).argmax()
        eng._eos.add(int(tok))
        stopped = [c async for c in eng.generate(req)]
        assert stopped[-1].finish_reason == "stop"
        s = Sampling(temperature=0, max_tokens=8, min_tokens=5)
        forced = [
            c async for c in eng.generate(GenerateRequest("r", messages=MESSAGES, sampling=s))
        ]
        assert forced[-1].completion_tokens >= 5
        assert chunks
        # one row, no queue: a request while the row is taken is refused with a retry hint
        gate = threading.Event()
        log = Log([eng.batcher])
        busy = _seq(log, "busy", PROMPTS[0], 100, seed=0)
        busy.emit = lambda s, t, f: gate.wait(10) and None  # type: ignore[func-returns-value,assignment]
        for _ in range(500):  # the last request's row is freed after its last token
            if not eng.batcher.running:
                break
            await asyncio.sleep(0.01)
        eng.batcher.submit([busy])
        try:
            with pytest.raises(EngineOverloadedError) as info:
                await eng.generate(req).__anext__()
        finally:
            busy.cancel()
            gate.set()
        err = to_api_error(info.value)
        assert err.status_code == 503
        assert err.code == "engine_overloaded"
        assert int(err.headers["Retry-After"]) >= 1  # type: ignore[attr-defined]
    finally:
        await eng.close()


def test_vllm_length_extensions_reach_the_engine() -> None:
    """``ignore_eos`` and ``min_tokens`` (vLLM's extensions, sent by ``vllm bench serve``
    and ``retort loadtest``) become engine sampling fields; negative ``min_tokens`` is a 400."""
    import msgspec

    from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
    from loadtest.dataset import Prompt, build_body

    body = build_body(
        "chat", "m", Prompt(text="hi"), max_tokens=7, temperature=0.0, stream=False, ignore_eos=True
    )
    assert body["ignore_eos"] is True
    assert body["min_tokens"] == 7
    chat = msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)
    s = chat.to_sampling()
    assert (s.ignore_eos, s.min_tokens, s.max_tokens) == (True, 7, 7)
    plain = msgspec.convert({"model": "m", "prompt": "x"}, CompletionRequest)
    assert (plain.to_sampling().ignore_eos, plain.to_sampling().min_tokens) == (False, 0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"model": "m", "prompt": "x", "min_tokens": -1}, CompletionRequest)


def test_constrained_row_shares_a_batch_with_free_rows(tiny_onnx: Path) -> None:
    """A row decoding against a JSON schema runs in lockstep with unconstrained rows: its
    tokens form JSON that matches the schema, theirs are what they would be alone."""
    import json

    from transformers import AutoTokenizer

    from gateway.engines.base import OutputConstraint
    from gateway.engines.guide import GuideCompiler

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    compiler = GuideCompiler(tiny_onnx, 400, {2})
    compiled = compiler.compile(OutputConstraint(schema))
    batcher, log = _batcher(tiny_onnx, max_batch=3)
    log.expect = 3
    guided = Sequence(
        PROMPTS[0], 30, log.emit, log.fail, temperature=1.0, seed=1, tag="json",
        guide=compiler.guide(compiled),
    )  # fmt: skip
    try:
        batcher.submit([guided, _seq(log, "a", PROMPTS[1], 6, 2), _seq(log, "b", PROMPTS[2], 6, 3)])
        assert log.done.wait(30)
    finally:
        batcher.close()
    assert not log.errors
    assert log.finish["json"] == "stop"
    text = AutoTokenizer.from_pretrained(str(tiny_onnx)).decode(log.tokens["json"])
    assert isinstance(json.loads(text)["ok"], bool)
    assert log.tokens["a"] == _alone(tiny_onnx, PROMPTS[1], 6, 2)


def test_unusable_schema_is_a_400_naming_the_field(tiny_onnx: Path) -> None:
    from gateway.engines.base import InvalidInputError, OutputConstraint
    from gateway.engines.guide import GuideCompiler

    compiler = GuideCompiler(tiny_onnx, 400, {2})
    with pytest.raises(InvalidInputError) as err:
        compiler.compile(OutputConstraint({"type": "nonsense"}, param="tool_choice"))
    assert err.value.param == "tool_choice"


def test_penalties_lower_repeated_tokens(tiny_onnx: Path) -> None:
    """Greedy decoding of a random tiny model repeats tokens; a large frequency penalty
    makes every token of the answer distinct."""

    def run(**penalties: float) -> list[int]:
        batcher, log = _batcher(tiny_onnx, max_batch=1)
        log.expect = 1
        seq = Sequence(PROMPTS[0], 12, log.emit, log.fail, ignore_eos=True, tag="x", **penalties)
        try:
            batcher.submit([seq])
            assert log.done.wait(30)
        finally:
            batcher.close()
        return log.tokens["x"]

    plain = run()
    assert len(set(plain)) < len(plain)  # the premise: greedy repeats itself here
    spread = run(frequency_penalty=100.0)
    assert len(set(spread)) == len(spread) == 12
    assert len(set(run(presence_penalty=100.0))) == 12


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student quantized as served by default (int4 ``MatMulNBits``)."""
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("int4")
    base = make_tiny_base(root / "base", seed=3, hidden_size=64, context=256)
    return build_onnx(base, root / "onnx", "int4")


def test_a_row_decodes_the_same_alone_and_in_a_batch(tiny_int4: Path) -> None:
    """Batch invariance: a row's logits are the same, bit for bit, whether it is decoded
    alone (padded to two rows) or beside one or seven others, so greedy answers do not
    depend on load, and the gate's one-at-a-time evaluation sees the served numbers."""
    runner = OrtRunner(tiny_int4)
    probe = [5, 6, 7, 8, 9, 10, 11]

    def first_row(others: int) -> np.ndarray:
        runner.release()
        runner.prefill(0, probe)
        for row in range(1, others + 1):
            runner.prefill(row, [20 + row, 21, 22, 23][: 1 + row % 4])
        lengths = np.asarray([len(probe)] + [1 + row % 4 for row in range(1, others + 1)])
        tokens = np.full(others + 1, 42)
        out: np.ndarray = runner.decode(tokens, lengths)[0].copy()
        return out

    alone = first_row(0)
    for others in (1, 7):
        np.testing.assert_array_equal(first_row(others), alone)
    # A lone row is decoded as two: the copy goes to the free row and is dropped.
    assert runner.decode(np.asarray([42]), np.asarray([len(probe)])).shape[0] == 1
