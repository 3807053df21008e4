"""An engine for distilled students: onnxruntime on the CPU, continuously batched.

Every request (each of its ``n`` choices a sequence) joins one shared decode loop
(:class:`~gateway.engines.onnx_batch.Batcher`): up to ``max_concurrency`` sequences advance
together, one token per step, and a waiting one takes the row of the first to finish. At
most ``max_queue`` sequences wait; past that a request is refused at once with
:class:`~gateway.engines.base.EngineOverloadedError` (HTTP 503 with ``Retry-After``). Tokens
are decoded on the worker thread and handed to the event loop through an
``asyncio.Queue``; closing the async iterator early cancels the request's sequences, whose
rows free up before the next step. Chat requests are rendered with the model's own chat
template (``og.Tokenizer.apply_chat_template``, the template the export copied from the
student's folder); onnxruntime-genai also supplies the tokenizer and streaming detokenizer.

Supported sampling: ``n``, ``max_tokens``, ``min_tokens``, ``ignore_eos``, ``temperature``
(0 = greedy), ``top_p``, ``seed``, ``stop``, ``logit_bias``, and constrained JSON output
(``response_format``, forced tool calls; :mod:`gateway.engines.guide`), and ``tools`` (in the
template when it takes them, else a Hermes system prompt: :mod:`retort.chat_template`, as on
the teacher), ``logprobs`` and presence/frequency penalties. Students take no
adapters: this engine is not an :class:`~gateway.engines.base.AdapterEngine`.

Usage::

    engine = await OnnxEngine.load(entry.onnx_path, model_name=entry.name)
    async for chunk in engine.generate(GenerateRequest("id", messages=[...])):
        ...
    await engine.close()
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.engines.base import (
    Chunk,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    EngineOverloadedError,
    GenerateRequest,
    InvalidInputError,
    PromptTooLongError,
    ServedModel,
    TokenLogprob,
    render_chat,
)
from gateway.engines.guide import GuideCompiler
from gateway.engines.onnx_batch import Batcher, OrtRunner, QueueFullError
from gateway.engines.onnx_batch import Sequence as Row

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

__all__ = ["OnnxEngine", "import_og"]


def import_og() -> Any:
    """``onnxruntime_genai``, or an ImportError naming the extra to install."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "student models need onnxruntime-genai: pip install 'retort-gateway[cpu]'"
        ) from exc
    return og


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could start a stop string."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


class OnnxEngine(ServedModel):
    """The :class:`~gateway.engines.base.Engine` protocol over an onnxruntime-genai folder."""

    def __init__(
        self,
        path: Path | str,
        *,
        model_name: str | None = None,
        max_model_len: int | None = None,
        max_concurrency: int = 32,
        max_queue: int = 256,
        default_max_tokens: int = 256,
        threads: int | None = None,
        batch_invariant: bool = True,
    ) -> None:
        """Load the model (blocking; use :meth:`load` from async code).

        Args:
            path: folder with ``genai_config.json`` (an exported student).
            model_name: served name; default the folder's parent name (the student's name
                in the registry) when the folder is called ``onnx``, else the folder name.
            max_model_len: context length; default the model's ``context_length``.
            max_concurrency: sequences decoded together in one step.
            max_queue: sequences that may wait for a place; more are refused (503).
            default_max_tokens: completion budget when a request sets none.
            threads: onnxruntime intra-op threads (default: its own choice).
            batch_invariant: decode a lone sequence as two rows, so that its tokens never
                depend on the batch (see :meth:`OrtRunner.decode`).
        """
        og = import_og()
        self._og = og
        self.path = Path(path)
        config = json.loads((self.path / "genai_config.json").read_text())
        context = int(config["model"].get("context_length", 2048))
        self._max_len = min(max_model_len, context) if max_model_len else context
        if model_name is None:
            model_name = self.path.parent.name if self.path.name == "onnx" else self.path.name
        self._name = model_name
        self._vocab = int(config["model"].get("vocab_size", 0))
        eos = config["model"].get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])
        try:
            self._model = og.Model(str(self.path))
            self._tokenizer = og.Tokenizer(self._model)
            runner = OrtRunner(self.path, threads=threads, batch_invariant=batch_invariant)
        except Exception as exc:
            raise EngineError(f"cannot load student {self.path}: {exc}") from exc
        if runner.vocab_size is not None and runner.vocab_size != self._vocab:
            raise EngineError(
                f"cannot load student {self.path}: its vocabulary map is for "
                f"{runner.vocab_size} tokens, genai_config.json says {self._vocab}"
            )
        self._kept = runner.kept_ids
        self._default_max = default_max_tokens
        self._batcher = Batcher(
            runner,
            eos=self._eos,
            vocab=self._vocab or 1 << 30,
            max_batch=max_concurrency,
            max_queue=max_queue,
            name=model_name,
        )
        self._guides = GuideCompiler(self.path, self._vocab, self._eos)
        template = self.path / "chat_template.jinja"
        self._template_takes_tools = template.is_file() and "tools" in template.read_text()
        self._closed = False
        self._dead = False
        self._inflight = 0

    @classmethod
    async def load(cls, path: Path | str, **kwargs: Any) -> OnnxEngine:
        """Construct in a worker thread (loading takes a moment)."""
        return await asyncio.to_thread(lambda: cls(path, **kwargs))

    # -- protocol -------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests being generated now."""
        return self._inflight

    @property
    def batcher(self) -> Batcher:
        """The decode loop (its ``running``, ``waiting``, ``steps``)."""
        return self._batcher

    def encode(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids (chat rendered with the model's template)."""
        if request.messages is not None:
            text = render_chat(
                request,
                self._template_takes_tools,
                lambda messages, tools: self._tokenizer.apply_chat_template(
                    json.dumps(messages),
                    tools=json.dumps(tools) if tools else None,
                    add_generation_prompt=True,
                ),
            )
            return [int(t) for t in self._tokenizer.encode(text)]
        if isinstance(request.prompt, list):
            return [int(t) for t in request.prompt]
        return [int(t) for t in self._tokenizer.encode(request.prompt or "")]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self._dead:
            raise EngineDeadError("the student engine has failed")
        if self._closed:
            raise EngineNotReadyError("the student engine is closed")
        s = request.sampling
        if request.adapter is not None:
            raise InvalidInputError("student models take no adapters", param="model")
        ids = await asyncio.to_thread(self.encode, request)
        n_prompt = len(ids)
        if n_prompt == 0:
            raise InvalidInputError("the prompt is empty", param="prompt")
        if self._vocab and any(t < 0 or t >= self._vocab for t in ids):
            raise InvalidInputError("prompt token id out of range", param="prompt")
        if n_prompt >= self._max_len:
            raise PromptTooLongError(n_prompt, self._max_len)
        bias = self._bias(s.logit_bias)
        compiled = None
        if s.constraint is not None:
            compiled = await asyncio.to_thread(self._guides.compile, s.constraint)
        budget = self._max_len - n_prompt
        budget = min(budget, s.max_tokens if s.max_tokens is not None else self._default_max)
        if s.min_tokens > budget and s.max_tokens is not None:
            raise InvalidInputError("min_tokens must not exceed max_tokens", param="min_tokens")
        self._inflight += 1
        try:
            if budget <= 0:
                for index in range(s.n):
                    yield Chunk(index, "", n_prompt, 0, "length")
                return
            async for chunk in self._choices(ids, budget, request, bias, compiled):
                yield chunk
        finally:
            self._inflight -= 1

    def _token_logprob(
        self, token: int, logprob: float, top: list[tuple[int, float]]
    ) -> TokenLogprob:
        """Decoded as vLLM does: each token's own text (called on the batcher's thread)."""
        return TokenLogprob(self._piece(token), logprob, [(self._piece(t), lp) for t, lp in top])

    def _piece(self, token: int) -> str:
        return str(self._tokenizer.decode(np.asarray([token], np.int32)))

    def _bias(self, logit_bias: Mapping[int, float] | None) -> np.ndarray | None:
        """``logit_bias`` as a vector over the vocabulary (a 400 for an unknown token)."""
        if not logit_bias:
            return None
        vocab = self._vocab or max(logit_bias) + 1
        bad = [t for t in logit_bias if t >= vocab]
        if bad:
            raise InvalidInputError(
                f"logit_bias token id {bad[0]} is outside the vocabulary ({vocab})",
                param="logit_bias",
            )
        unreachable = [
            t
            for t, v in logit_bias.items()
            if v > 0 and self._kept is not None and t not in self._kept
        ]
        if unreachable:
            raise InvalidInputError(
                f"logit_bias token id {unreachable[0]} can never be produced by {self._name}: "
                "its output vocabulary is trimmed to the tokens of its task "
                "(export.output_vocab: trimmed)",
                param="logit_bias",
            )
        bias = np.zeros(vocab, np.float32)
        for token, value in logit_bias.items():
            bias[token] = value
        return bias

    async def _choices(
        self,
        ids: list[int],
        budget: int,
        request: GenerateRequest,
        bias: np.ndarray | None,
        compiled: Any,
    ) -> AsyncIterator[Chunk]:
        """Run the request's ``n`` sequences in the batch; chunks of all choices, as they
        come. Stop strings are matched here, on the decoded text of each choice."""
        s = request.sampling
        n_prompt = len(ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[
            tuple[int, str | BaseException | None, str | None, TokenLogprob | None]
        ] = asyncio.Queue()
        streams = [self._tokenizer.create_stream() for _ in range(s.n)]

        def emit(seq: Row, token: int | None, finish: str | None) -> None:
            piece = streams[seq.tag].decode(token) if token is not None else ""
            lp = None
            if token is not None and seq.last_logprobs is not None:
                lp = self._token_logprob(token, *seq.last_logprobs)
            loop.call_soon_threadsafe(queue.put_nowait, (seq.tag, piece, finish, lp))

        def fail(seq: Row, exc: BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (seq.tag, exc, None, None))

        seqs = [
            Row(
                ids,
                budget,
                emit,
                fail,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=None if s.seed is None else s.seed + index,
                min_tokens=s.min_tokens,
                ignore_eos=s.ignore_eos,
                tag=index,
                logprobs=s.logprobs,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                bias=bias,
                guide=None if compiled is None else self._guides.guide(compiled),
            )
            for index in range(s.n)
        ]
        try:
            self._batcher.submit(seqs)
        except QueueFullError as exc:
            raise EngineOverloadedError(
                f"student {self._name!r} is at capacity ({exc}); retry later",
                retry_after=exc.retry_after,
            ) from exc
        except RuntimeError as exc:
            raise EngineNotReadyError("the student engine is closed") from exc
        stops = [st for st in s.stop if st]
        texts = [""] * s.n  # generated so far, per choice
        sent = [0] * s.n  # characters of each text already yielded
        counts = [0] * s.n  # tokens, the end token included (as vLLM counts)
        ended = [False] * s.n
        lps: list[list[TokenLogprob]] = [[] for _ in range(s.n)]  # not yet yielded
        want_lps = s.logprobs is not None

        def chunk(index: int, text: str, finish: str | None = None) -> Chunk:
            out = Chunk(index, text, n_prompt, counts[index], finish)
            if want_lps:
                out.logprobs, lps[index] = lps[index], []
            return out

        try:
            while not all(ended):
                index, item, finish, lp = await queue.get()
                if ended[index]:
                    continue  # stopped by a stop string; late tokens are dropped
                if isinstance(item, InvalidInputError):
                    raise item  # the request asks what this student cannot do: a 400
                if isinstance(item, BaseException):
                    raise EngineError(f"student generation failed: {item}") from item
                counts[index] += 1
                if lp is not None:
                    lps[index].append(lp)
                text = texts[index] = texts[index] + (item or "")
                start = sent[index]
                if stops:
                    cuts = [text.find(st, max(0, start - len(st))) for st in stops]
                    hits = [i for i in cuts if i >= 0]
                    if hits:
                        ended[index] = True
                        seqs[index].cancel()
                        self._batcher.wake()
                        yield chunk(index, text[start : min(hits)], "stop")
                        continue
                    safe = len(text) - _held_back(text, stops)
                else:
                    safe = len(text)
                if finish is not None:
                    ended[index] = True
                    yield chunk(index, text[start:], finish)
                elif safe > start:
                    sent[index] = safe
                    yield chunk(index, text[start:safe])
        finally:
            for seq in seqs:
                seq.cancel()
            self._batcher.wake()

    def ready(self) -> bool:
        return not self._closed and not self._dead

    def dead(self) -> bool:
        return self._dead

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._batcher.close)
