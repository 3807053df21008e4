"""Continuous batching for students: one decode step serves every running sequence.

Just past ~400 lines on purpose: the runner and the batcher that owns it are one decode loop
and read top to bottom.

:class:`OrtRunner` runs an exported student's ``model.onnx`` with onnxruntime directly. Its
key/value cache is one buffer per layer, ``[rows, kv_heads, length, head_size]``, shared by
``past_key_values.*`` and ``present.*`` (GroupQueryAttention writes the new token in place).
Each running sequence owns a row, right-padded: the attention mask gives every row its own
length, so rows of different lengths share a step and a row can leave or join between
steps. A new sequence is prefilled alone into its row; finishing frees the row by moving the
last row into it.

:class:`Batcher` owns the runner on one worker thread: sequences wait in a bounded FIFO,
join the batch (up to ``max_batch`` rows) as rows free up, and every step decodes one token
for each running row, so all running sequences advance at the same pace. Sampling is per
row (greedy, or temperature/top-p with the sequence's own seeded generator), as are
``min_tokens`` and ``ignore_eos`` (the end token is masked until then), ``logprobs``,
presence/frequency penalties, ``logit_bias`` and
grammar-constrained output (:mod:`gateway.engines.guide`: each row's allowed tokens are
masked before it samples).

onnxruntime-genai's own ``og.Engine`` was measured first: on the CPU it offers only its
static batch (a batch admits up to four requests and takes no new one until all have
finished; per-request seeds and stop strings need its dynamic batching, which needs a
PagedAttention export, CUDA only), and batched ``og.Generator`` calls pad on the left,
which changed the greedy tokens of every row of a mixed-length batch of our students.

A student exported with a trimmed output vocabulary (``export.output_vocab: trimmed``,
:mod:`distill.vocab`) computes logits for only the token ids in :data:`VOCAB_MAP_FILE`
next to its model; the runner scatters them into full-vocabulary rows filled with ``-inf``,
so everything downstream (sampling, logprobs, ``logit_bias``, penalties, grammars, stop
tokens) sees the tokenizer's vocabulary, and tokens outside the kept set have probability 0.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.engines.base import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.engines.guide import Guide

__all__ = [
    "VOCAB_MAP_FILE",
    "Batcher",
    "OrtRunner",
    "QueueFullError",
    "Sequence",
    "load_vocab_map",
    "sample_token",
    "token_logprobs",
]

log = logging.getLogger("retort.students")


class QueueFullError(RuntimeError):
    """The waiting queue is full; ``retry_after`` estimates when a place frees up."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} sequences are already waiting")
        self.retry_after = retry_after


VOCAB_MAP_FILE = "vocab_map.json"
"""``{"vocab_size": V, "ids": [kept ids, ascending]}``: the model's logits are for ``ids`` only."""


def load_vocab_map(path: Path) -> tuple[np.ndarray, int] | None:
    """The kept token ids and the full vocabulary size from ``path``'s :data:`VOCAB_MAP_FILE`
    (``None`` when the folder has none); ``ValueError`` when it is malformed."""
    file = Path(path) / VOCAB_MAP_FILE
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    if not isinstance(data, dict) or set(data) != {"vocab_size", "ids"}:
        raise ValueError(f"{file}: expected exactly the keys vocab_size and ids")
    size, ids = data["vocab_size"], np.asarray(data["ids"], np.int64)
    if not isinstance(size, int) or ids.ndim != 1 or not len(ids):
        raise ValueError(f"{file}: vocab_size must be an integer and ids a non-empty list")
    if ids[0] < 0 or ids[-1] >= size or (len(ids) > 1 and not (np.diff(ids) > 0).all()):
        raise ValueError(f"{file}: ids must be ascending, unique and below vocab_size")
    return ids, size


class OrtRunner:
    """An exported student's decoder on onnxruntime, with a growable shared KV buffer."""

    def __init__(
        self, path: Path, *, threads: int | None = None, batch_invariant: bool = True
    ) -> None:
        import onnxruntime as ort

        self.batch_invariant = batch_invariant
        """Decode one row as two, so that tokens never depend on the batch (:meth:`decode`)."""

        self._ort = ort
        config = json.loads((path / "genai_config.json").read_text())
        dec = config["model"]["decoder"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle pool threads sleep instead of spinning: the event loop shares these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path / dec["filename"]), options, providers=["CPUExecutionProvider"]
        )
        layers = int(dec["num_hidden_layers"])
        ins, outs = dec["inputs"], dec["outputs"]
        self._past = [ins["past_key_names"] % i for i in range(layers)] + [
            ins["past_value_names"] % i for i in range(layers)
        ]
        self._present = [outs["present_key_names"] % i for i in range(layers)] + [
            outs["present_value_names"] % i for i in range(layers)
        ]
        self._ids_name = ins.get("input_ids", "input_ids")
        self._mask_name = ins.get("attention_mask", "attention_mask")
        self._logits_name = outs.get("logits", "logits")
        self._vocab_map = load_vocab_map(path)
        if self._vocab_map is not None:
            out = {o.name: o for o in self._session.get_outputs()}[self._logits_name]
            if out.shape[-1] != len(self._vocab_map[0]):
                raise ValueError(
                    f"{path / VOCAB_MAP_FILE} keeps {len(self._vocab_map[0])} tokens but the "
                    f"model's {self._logits_name} has {out.shape[-1]}"
                )
        declared = {i.name: i for i in self._session.get_inputs()}
        unknown = set(declared) - {self._ids_name, self._mask_name, *self._past}
        if unknown:
            raise ValueError(f"unsupported student export: inputs {sorted(unknown)}")
        self._ids_dtype = np.int32 if declared[self._ids_name].type == "tensor(int32)" else np.int64
        kv_type = declared[self._past[0]].type
        self._kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self._kv_heads = int(dec["num_key_value_heads"])
        self._head = int(dec["head_size"])
        self._bufs: list[np.ndarray] = []
        self._views: dict[tuple[int, int], list[Any]] = {}  # (start, stop) -> OrtValues
        self._rows = 0
        self._length = 0

    @property
    def bytes_per_token(self) -> int:
        """KV cache bytes one token of one row takes."""
        return len(self._past) * self._kv_heads * self._head * np.dtype(self._kv_dtype).itemsize

    def reserve(self, rows: int, length: int) -> None:
        """Grow the buffers (rows and length, doubling) to hold ``rows`` x ``length``."""
        if rows <= self._rows and length <= self._length:
            return
        new_rows = max(rows, self._rows)
        new_len = self._length or 64
        while new_len < length:
            new_len *= 2
        shape = (new_rows, self._kv_heads, new_len, self._head)
        grown = []
        for i in range(len(self._past)):
            buf = np.zeros(shape, self._kv_dtype)
            if self._bufs:
                buf[: self._rows, :, : self._length] = self._bufs[i]
            grown.append(buf)
        self._bufs, self._rows, self._length = grown, new_rows, new_len
        self._views = {}

    def _run(self, start: int, stop: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        values = self._views.get((start, stop))
        if values is None:
            make = self._ort.OrtValue.ortvalue_from_numpy
            values = [make(buf[start:stop]) for buf in self._bufs]
            self._views[(start, stop)] = values
        io = self._session.io_binding()
        io.bind_cpu_input(self._ids_name, ids.astype(self._ids_dtype, copy=False))
        io.bind_cpu_input(self._mask_name, mask)
        for past, present, value in zip(self._past, self._present, values, strict=True):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_output(self._logits_name)
        self._session.run_with_iobinding(io)
        logits = np.asarray(io.get_outputs()[-1].numpy())
        logits = logits[:, -1, :] if logits.ndim == 3 else logits
        if self._vocab_map is None:
            return logits
        ids, size = self._vocab_map
        full = np.full((logits.shape[0], size), -np.inf, logits.dtype)
        full[:, ids] = logits
        return full

    @property
    def output_vocab(self) -> int | None:
        """Token ids the model computes logits for, when its output vocabulary is trimmed."""
        return None if self._vocab_map is None else len(self._vocab_map[0])

    @property
    def vocab_size(self) -> int | None:
        """The full vocabulary its logits are scattered into, when trimmed."""
        return None if self._vocab_map is None else self._vocab_map[1]

    @property
    def kept_ids(self) -> frozenset[int] | None:
        """The token ids it can produce, when its output vocabulary is trimmed."""
        return None if self._vocab_map is None else frozenset(self._vocab_map[0].tolist())

    def prefill(self, row: int, ids: list[int]) -> np.ndarray:
        """Run the prompt into ``row``'s cache; the next-token logits ``[vocab]``."""
        self.reserve(row + 1, len(ids) + 1)
        mask = np.ones((1, len(ids)), np.int64)
        logits: np.ndarray = self._run(row, row + 1, np.asarray([ids]), mask)[0]
        return logits

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One token for rows ``0..B-1`` (``lengths``: tokens already cached per row);
        the next-token logits ``[B, vocab]``.

        A single row is decoded as two (the second, a copy, in the free row 1, its output
        dropped). onnxruntime's quantized matmul (``MatMulNBits``) takes another kernel for
        one row than for several, and their logits differ by up to ~2%: enough to flip a
        greedy token. Two rows or more all take the same kernel, so a sequence's tokens do
        not depend on how many others share its steps: the same prompt gives the same
        greedy answer alone or under load, and the distillation gate (which decodes one
        sequence at a time) judges the numbers the gateway serves."""
        if len(tokens) == 1 and self.batch_invariant:
            return self._decode(np.repeat(tokens, 2), np.repeat(lengths, 2))[:1]
        return self._decode(tokens, lengths)

    def _decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        b = len(tokens)
        total = int(lengths.max()) + 1
        self.reserve(b, total)
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        return self._run(0, b, tokens.reshape(b, 1), mask)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src``'s cache into row ``dst``."""
        for buf in self._bufs:
            buf[dst] = buf[src]

    def release(self) -> None:
        """Drop the buffers (they grow again on demand)."""
        self._bufs, self._rows, self._length, self._views = [], 0, 0, {}


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy when ``temperature`` is 0, else temperature and nucleus (top-p) sampling."""
    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        kept = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(len(keep), p=kept)])
    return int(rng.choice(len(probs), p=probs))


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under ``logits`` and the ``k`` most likely tokens."""
    z = logits.astype(np.float64)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    top = np.argpartition(-logp, k)[:k] if 0 < k < len(logp) else np.arange(len(logp))[:k]
    ranked = sorted(((int(t), float(logp[t])) for t in top), key=lambda p: -p[1])
    return float(logp[token]), ranked


@dataclass(eq=False)
class Sequence:
    """One choice being generated. ``emit(seq, token, finish)`` is called on the worker
    thread for every token (``finish`` set on the last) or with ``token=None`` when the
    sequence ends without one; ``fail(seq, exc)`` when it cannot continue."""

    ids: list[int]
    budget: int
    emit: Callable[[Sequence, int | None, str | None], None]
    fail: Callable[[Sequence, BaseException], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    tag: Any = None
    """The caller's own (e.g. the choice index)."""
    bias: np.ndarray | None = field(default=None, repr=False)
    """Added to the logits before sampling (``logit_bias``), ``[vocab]``."""
    guide: Guide | None = field(default=None, repr=False)
    """Constrained decoding: the tokens allowed next, and the grammar state to advance."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    """OpenAI's penalties: subtracted from the logit of every token already generated, once
    (presence) and per occurrence (frequency)."""
    counts: dict[int, int] = field(default_factory=dict, repr=False)
    """Generated tokens and how often each came (kept only with a penalty)."""
    logprobs: int | None = None
    """``None``: none; ``k``: each token's log-probability and the top ``k`` alternatives
    (from the model's own distribution, as vLLM's default ``raw_logprobs``), left in
    :attr:`last_logprobs` before the token is emitted."""
    last_logprobs: tuple[float, list[tuple[int, float]]] | None = field(default=None, repr=False)
    cancelled: bool = False
    produced: int = 0
    length: int = 0
    last: int = 0
    rng: Any = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop generating (checked before every step); safe from any thread."""
        self.cancelled = True


class Batcher:
    """Continuous batching over an :class:`OrtRunner`, on its own worker thread."""

    def __init__(
        self,
        runner: OrtRunner,
        *,
        eos: set[int],
        vocab: int,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_tokens: int = 512,
        name: str = "student",
    ) -> None:
        """
        Args:
            runner: the model.
            eos: end-of-sequence token ids.
            vocab: vocabulary size (logits beyond it are ignored).
            max_batch: rows decoded together in one step.
            max_queue: sequences that may wait for a row; more are refused.
            prefill_tokens: prompt tokens prefilled between two decode steps (at least one
                prompt), so that joining sequences do not stall the running ones for long.
        """
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self._runner = runner
        self._eos = eos  # shared with the caller, who may extend it
        self._vocab = vocab
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._prefill_tokens = prefill_tokens
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._joining = 0  # taken from the queue, being prefilled
        self._cond = threading.Condition()
        self._stop = False
        self._step_s = 0.0  # moving average of a decode step
        self.steps = 0
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences holding a row (being prefilled or decoded)."""
        return len(self._running) + self._joining

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (all or none); :class:`QueueFullError` when they do not fit."""
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is closed")
            free_rows = self.max_batch - len(self._running) - self._joining
            if len(self._waiting) + len(seqs) > self.max_queue + max(0, free_rows):
                raise QueueFullError(len(self._waiting), self._retry_after())
            for seq in seqs:
                if seq.temperature > 0:
                    seq.rng = np.random.default_rng(seq.seed)
                self._waiting.append(seq)
            self._cond.notify()

    def _retry_after(self) -> int:
        """Seconds until the queue has likely moved by a batch: waiting batches x a typical
        sequence's steps x the step time."""
        typical = sum(s.budget - s.produced for s in self._running) / max(1, len(self._running))
        batches = 1 + len(self._waiting) / self.max_batch
        return max(1, math.ceil(batches * max(typical, 16) * max(self._step_s, 0.01)))

    def wake(self) -> None:
        """Have the worker notice a cancellation now."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker; sequences still queued or running fail."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    # -- the worker thread -----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._drop_cancelled()
                    joining = self._admit()
                for seq in joining:
                    self._prefill(seq)
                if self._running:
                    self._step()
                elif not self._waiting:
                    self._runner.release()
        finally:
            exc = RuntimeError("the student engine is closed")
            with self._cond:
                left = list(self._waiting) + self._running
                self._waiting.clear()
                self._running = []
            for seq in left:
                seq.fail(seq, exc)

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in self._running if s.cancelled]:
            self._remove(seq)

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences (FIFO) into free rows, within the prefill budget."""
        joining: list[Sequence] = []
        tokens = 0
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            if joining and tokens + len(self._waiting[0].ids) > self._prefill_tokens:
                break
            seq = self._waiting.popleft()
            tokens += len(seq.ids)
            joining.append(seq)
        self._joining = len(joining)
        return joining

    def _remove(self, seq: Sequence) -> None:
        row = self._running.index(seq)
        last = len(self._running) - 1
        if row != last:
            self._runner.move(last, row)
            self._running[row] = self._running[last]
        self._running.pop()

    def _prefill(self, seq: Sequence) -> None:
        row = len(self._running)
        try:
            logits = self._runner.prefill(row, seq.ids)
        except Exception as exc:
            log.exception("student prefill failed")
            with self._cond:
                self._joining -= 1
            seq.fail(seq, exc)
            return
        seq.length = len(seq.ids)
        keep = self._next(seq, logits[: self._vocab])
        with self._cond:
            self._joining -= 1
            if keep:
                self._running.append(seq)
                self.max_rows_seen = max(self.max_rows_seen, len(self._running))

    def _step(self) -> None:
        running = list(self._running)
        tokens = np.asarray([s.last for s in running], np.int64)
        lengths = np.asarray([s.length for s in running], np.int64)
        t0 = time.perf_counter()
        try:
            logits = self._runner.decode(tokens, lengths)
        except Exception as exc:
            log.exception("student decode step failed")
            with self._cond:
                self._running = []
            for seq in running:
                seq.fail(seq, exc)
            return
        dt = time.perf_counter() - t0
        self._step_s = dt if not self.steps else 0.9 * self._step_s + 0.1 * dt
        self.steps += 1
        done = []
        for row, seq in enumerate(running):
            seq.length += 1
            if seq.cancelled or not self._next(seq, logits[row, : self._vocab]):
                done.append(seq)
        with self._cond:
            for seq in done:
                self._remove(seq)

    def _next(self, seq: Sequence, logits: np.ndarray) -> bool:
        """Pick ``seq``'s next token from ``logits`` and hand it out; False when it ended."""
        if seq.cancelled:
            return False
        raw = logits  # a view of the step's output: logprobs read it, adjustments copy it
        mask_eos = seq.ignore_eos or seq.produced < seq.min_tokens
        if seq.bias is not None or seq.counts or seq.guide is not None or mask_eos:
            logits = logits.copy()
            if seq.bias is not None:
                logits += seq.bias
            if seq.counts:
                ids = np.fromiter(seq.counts, np.int64, len(seq.counts))
                n = np.fromiter(seq.counts.values(), np.float32, len(seq.counts))
                logits[ids] -= seq.presence_penalty + seq.frequency_penalty * n
            if seq.guide is not None:
                logits[~seq.guide.allowed()] = -np.inf
            if mask_eos:
                logits[[t for t in self._eos if t < len(logits)]] = -np.inf
                if seq.guide is not None and not np.isfinite(logits).any():
                    seq.emit(seq, None, "stop")  # the grammar is complete: only the end is left
                    return False
            if seq.guide is not None and not np.isfinite(logits).any():
                # a trimmed output vocabulary holds none of the tokens the grammar allows: the
                # request asks for output this student cannot write (a 400, not a failure)
                seq.fail(
                    seq,
                    InvalidInputError(
                        "the student's output vocabulary is trimmed to the tokens of its task "
                        "and holds none of the tokens the requested output format allows here "
                        "(response_format or tools): send this request to the teacher"
                    ),
                )
                return False
        token = sample_token(logits, seq.temperature, seq.top_p, seq.rng)
        if seq.guide is not None and token not in self._eos and not seq.guide.accept(token):
            seq.fail(seq, RuntimeError(f"token {token} breaks the output grammar"))
            return False
        if seq.logprobs is not None:
            seq.last_logprobs = token_logprobs(raw, token, seq.logprobs)
        if seq.presence_penalty or seq.frequency_penalty:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        if token in self._eos:
            seq.produced += 1
            seq.emit(seq, None, "stop")
            return False
        seq.produced += 1
        seq.last = token
        if seq.produced >= seq.budget:
            seq.emit(seq, token, "length")
            return False
        seq.emit(seq, token, None)
        return True
