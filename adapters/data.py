"""Chat data for LoRA SFT: read ``{"messages": [...]}`` JSONL, tokenize, mask.

Each example is rendered with the tokenizer's chat template. Only the assistant turns are
learned: every other token's label is ``-100`` (ignored by the loss). Assistant spans are
found in characters by rendering prefixes of the conversation (the template must render a
conversation's prefix as a prefix of the whole, true of ChatML-style templates), then
mapped onto tokens through the fast tokenizer's offsets, so the mask is exact whatever
the template looks like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import AdapterError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "assistant_spans",
    "encode_chat",
    "label_tokens",
    "read_chat_jsonl",
]

IGNORE_INDEX = -100
"""Label of tokens the loss ignores."""

Message = dict[str, str]


class DataError(AdapterError, ValueError):
    """The training data is malformed."""


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized conversation."""

    input_ids: list[int]
    """Token ids of the rendered conversation."""
    labels: list[int]
    """``input_ids`` on assistant tokens, :data:`IGNORE_INDEX` elsewhere."""


def read_chat_jsonl(path: Path) -> list[list[Message]]:
    """Conversations from a JSONL file of ``{"messages": [{"role", "content"}, ...]}``.

    Raises:
        DataError: a line is not such an object, or no conversation has an assistant turn.
    """
    conversations: list[list[Message]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not JSON ({exc})") from exc
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{path}:{lineno}: expected {{"messages": [...]}}')
        conv: list[Message] = []
        for m in messages:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise DataError(f"{path}:{lineno}: each message needs string role and content")
            conv.append({"role": m["role"], "content": m["content"]})
        conversations.append(conv)
    if not any(m["role"] == "assistant" for c in conversations for m in c):
        raise DataError(f"{path}: no assistant messages to learn from")
    return conversations


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, gen: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
    if not isinstance(text, str):  # pragma: no cover - tokenize=False returns text
        raise DataError("the chat template did not render text")
    return text


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the end of the generation prompt (``<|im_start|>assistant\\n``) to
    the end of that turn as rendered (its content and end-of-turn marker).

    Raises:
        DataError: the template does not render prefixes as prefixes.
    """
    full = _render(tokenizer, messages, gen=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], gen=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], gen=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the chat template does not render a conversation's prefix as its prefix; "
                "cannot locate the assistant tokens"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def label_tokens(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
) -> list[int]:
    """Labels for ``input_ids``: the id where a token starts inside a span, else ignored.

    Pure: ``offsets[i]`` is token ``i``'s ``(start, end)`` in characters.
    """
    labels: list[int] = []
    for tok, (start, end) in zip(input_ids, offsets, strict=True):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return labels


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_len: int
) -> Example:
    """Tokenize one conversation (truncated to ``max_len`` tokens) with its loss mask."""
    text, spans = assistant_spans(tokenizer, messages)
    enc: Any = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=False
    )
    ids = list(enc["input_ids"])[:max_len]
    offsets = [tuple(o) for o in enc["offset_mapping"]][:max_len]
    return Example(ids, label_tokens(ids, offsets, spans))
