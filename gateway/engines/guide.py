"""Grammar-constrained decoding for students: ``response_format`` and forced tool calls.

The same library vLLM's structured outputs use here (xgrammar, shipped with vLLM) compiles
the JSON schema against the student's tokenizer; each sequence gets its own matcher, which
gives the tokens allowed next (a bitmask the batcher applies to the row's logits) and
follows the tokens chosen. JSON is compact, as on the teacher (``disable_any_whitespace``).

Compiled grammars are cached per schema, and the tokenizer is read once, on the first
constrained request (it needs ``transformers``, which a process serving vLLM has imported
already).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gateway.engines.base import InvalidInputError, OutputConstraint

__all__ = ["Guide", "GuideCompiler"]

_CACHE = 64
"""Compiled grammars kept per student (an LRU, keyed by the schema's JSON)."""


class Guide:
    """One sequence's grammar state."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        import xgrammar as xgr

        self._matcher = matcher
        self._vocab = vocab
        self._bitmask = xgr.allocate_token_bitmask(1, vocab)

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary: the tokens the grammar accepts next."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")
        mask: np.ndarray = bits[: self._vocab].astype(bool)
        return mask

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it."""
        return bool(self._matcher.accept_token(token))


class GuideCompiler:
    """Compiles constraints for one student (its tokenizer, vocabulary and end tokens)."""

    def __init__(self, path: Path, vocab: int, eos: set[int]) -> None:
        self._path = path
        self._vocab = vocab
        self._eos = sorted(eos)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self._path))
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self._vocab, stop_token_ids=self._eos
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, constraint: OutputConstraint) -> Any:
        """The compiled grammar; :class:`InvalidInputError` naming the field when the
        schema cannot be compiled. Blocking: call it from a worker thread."""
        schema = constraint.json_schema
        # json_object means an object, as vLLM's xgrammar backend compiles it.
        key = json.dumps({"type": "object"} if schema is None else schema, sort_keys=True)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._get_compiler()
            try:
                compiled = compiler.compile_json_schema(key, any_whitespace=False)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses
                raise InvalidInputError(
                    f"the JSON schema cannot be used for constrained output: {exc}",
                    param=constraint.param,
                ) from exc
            self._cache[key] = compiled
            if len(self._cache) > _CACHE:
                self._cache.popitem(last=False)
            return compiled

    def guide(self, compiled: Any) -> Guide:
        """A fresh matcher for one sequence."""
        import xgrammar as xgr

        return Guide(xgr.GrammarMatcher(compiled), self._vocab)
