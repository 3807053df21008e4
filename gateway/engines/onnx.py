"""An engine for distilled students: onnxruntime-genai on the CPU (or its CUDA EP).

Each request (and each of its ``n`` choices) runs its own ``og.Generator`` in a worker
thread of a bounded pool; tokens are decoded there and handed to the event loop through an
``asyncio.Queue``. Closing the async iterator early sets a flag the worker checks before
every token, so generation stops within one token. Chat requests are rendered with the
model's own chat template (``og.Tokenizer.apply_chat_template``, i.e. the template the
export copied from the student's folder).

Supported sampling: ``n``, ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``,
``stop``. ``logprobs`` is refused (400); presence/frequency penalties are ignored. Students
take no adapters: :meth:`load_adapter` raises :class:`InvalidInputError`.

Usage::

    engine = await OnnxEngine.load(entry.onnx_path, model_name=entry.name)
    async for chunk in engine.generate(GenerateRequest("id", messages=[...])):
        ...
    await engine.close()
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.engines.base import (
    Chunk,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    GenerateRequest,
    InvalidInputError,
    PromptTooLongError,
    refuse_unsupported,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

__all__ = ["OnnxEngine", "import_og"]

_DONE = object()


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


class OnnxEngine:
    """The :class:`~gateway.engines.base.Engine` protocol over an onnxruntime-genai folder."""

    def __init__(
        self,
        path: Path | str,
        *,
        model_name: str | None = None,
        max_model_len: int | None = None,
        max_concurrency: int = 4,
        default_max_tokens: int = 256,
    ) -> None:
        """Load the model (blocking; use :meth:`load` from async code).

        Args:
            path: folder with ``genai_config.json`` (an exported student).
            model_name: served name; default the folder's parent name (the student's name
                in the registry) when the folder is called ``onnx``, else the folder name.
            max_model_len: context length; default the model's ``context_length``.
            max_concurrency: generators running at once; more requests wait their turn.
            default_max_tokens: completion budget when a request sets none.
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
        except Exception as exc:
            raise EngineError(f"cannot load student {self.path}: {exc}") from exc
        self._default_max = default_max_tokens
        self._pool = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix=f"onnx-{model_name}"
        )
        self._closed = False
        self._dead = False
        self._inflight = 0

    @classmethod
    async def load(cls, path: Path | str, **kwargs: Any) -> OnnxEngine:
        """Construct in a worker thread (loading takes a moment)."""
        return await asyncio.to_thread(lambda: cls(path, **kwargs))

    # -- protocol -------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def inflight(self) -> int:
        """Requests being generated now."""
        return self._inflight

    def encode(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids (chat rendered with the model's template)."""
        if request.messages is not None:
            text = self._tokenizer.apply_chat_template(
                json.dumps(request.messages), add_generation_prompt=True
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
        if s.logprobs is not None:
            raise InvalidInputError("student models do not return logprobs", param="logprobs")
        if request.adapter is not None:
            raise InvalidInputError("student models take no adapters", param="model")
        refuse_unsupported(request, "student models")
        ids = await asyncio.to_thread(self.encode, request)
        n_prompt = len(ids)
        if n_prompt == 0:
            raise InvalidInputError("the prompt is empty", param="prompt")
        if self._vocab and any(t < 0 or t >= self._vocab for t in ids):
            raise InvalidInputError("prompt token id out of range", param="prompt")
        if n_prompt >= self._max_len:
            raise PromptTooLongError(n_prompt, self._max_len)
        budget = self._max_len - n_prompt
        budget = min(budget, s.max_tokens if s.max_tokens is not None else self._default_max)
        self._inflight += 1
        try:
            for index in range(s.n):
                seed = None if s.seed is None else s.seed + index
                async for chunk in self._choice(index, ids, budget, seed, request):
                    yield chunk
        finally:
            self._inflight -= 1

    async def _choice(
        self, index: int, ids: list[int], budget: int, seed: int | None, request: GenerateRequest
    ) -> AsyncIterator[Chunk]:
        s = request.sampling
        n_prompt = len(ids)
        if budget <= 0:
            yield Chunk(index, "", n_prompt, 0, "length")
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._run(ids, budget, s.temperature, s.top_p, seed, cancel, put, s.ignore_eos)
            except BaseException as exc:  # handed to the event loop
                put(exc)
            finally:
                put(_DONE)

        future = loop.run_in_executor(self._pool, work)
        stops = [st for st in s.stop if st]
        text = ""  # generated so far (this choice)
        sent = 0  # characters of ``text`` already yielded
        count = 0
        finish: str | None = None
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise EngineError(f"student generation failed: {item}") from item
                piece, reason = item
                count += 1
                text += piece
                if stops:
                    hits = [
                        i for i in (text.find(st, max(0, sent - len(st))) for st in stops) if i >= 0
                    ]
                    if hits:
                        cut = min(hits)
                        cancel.set()
                        yield Chunk(index, text[sent:cut], n_prompt, count, "stop")
                        return
                    safe = len(text) - _held_back(text, stops)
                else:
                    safe = len(text)
                if reason is not None:
                    finish = reason
                    break
                if safe > sent:
                    yield Chunk(index, text[sent:safe], n_prompt, count)
                    sent = safe
            yield Chunk(index, text[sent:], n_prompt, count, finish or "length")
        finally:
            cancel.set()
            if not future.done():
                # Let the worker notice; do not block the loop on it.
                future.add_done_callback(lambda f: f.exception())

    def _run(
        self,
        ids: list[int],
        budget: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        cancel: threading.Event,
        put: Any,
        ignore_eos: bool = False,
    ) -> None:
        """Worker thread: generate up to ``budget`` tokens, handing ``(text, finish)`` out."""
        import numpy as np

        og = self._og
        params = og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": len(ids) + budget, "do_sample": temperature > 0}
        if ignore_eos:
            options["min_length"] = len(ids) + budget  # og masks EOS until then
        if temperature > 0:
            options.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
            if seed is not None:
                options["random_seed"] = int(seed)
        params.set_search_options(**options)
        generator = og.Generator(self._model, params)
        stream = self._tokenizer.create_stream()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        produced = 0
        while not cancel.is_set():
            if generator.is_done():
                put(("", "stop" if produced < budget else "length"))
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            produced += 1
            if token in self._eos and not ignore_eos:
                put(("", "stop"))
                return
            piece = stream.decode(token)
            put((piece, "length" if produced >= budget else None))
            time.sleep(0)  # let the event loop take the GIL and forward the token now
            if produced >= budget:
                return

    async def load_adapter(self, name: str, path: str) -> None:
        raise InvalidInputError(f"student {self._name!r} takes no adapters", param="lora_name")

    async def unload_adapter(self, name: str) -> None:
        raise InvalidInputError(f"student {self._name!r} takes no adapters", param="lora_name")

    def adapters(self) -> list[str]:
        return []

    def ready(self) -> bool:
        return not self._closed and not self._dead

    def dead(self) -> bool:
        return self._dead

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
