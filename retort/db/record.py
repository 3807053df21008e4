"""The prompt log's record: one finished (or failed) request."""

from __future__ import annotations

import os
from sys import getsizeof
from typing import Any, Literal

import msgspec

__all__ = ["LogRecord"]

_RECORD_OVERHEAD = 1000
"""Bytes charged per record on top of its text (the Struct, dicts, small strings)."""
_MESSAGE_OVERHEAD = 100


class LogRecord(msgspec.Struct, kw_only=True):
    """What the gateway knows about a request once its last byte is sent.

    Exactly one of ``messages`` (chat) and ``prompt`` (completions) is set. Token counts,
    latency and cost are those the response reported.
    """

    request_id: str
    created: float
    """Unix time (seconds) the request arrived."""
    model: str
    """The served model name (the base model or a student)."""
    endpoint: Literal["chat", "completions", "responses"]
    key_id: str | None = None
    """The API key's id (never the key); ``None`` when auth is off."""
    adapter: str | None = None
    """The LoRA adapter; ``None`` for the base model or a student."""
    served_by: Literal["engine", "student"] = "engine"
    messages: list[dict[str, Any]] | None = None
    """Chat messages as sent: ``{"role", "content"}`` (content a string or text parts)."""
    prompt: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    """Sampling parameters (temperature, top_p, max_tokens, stop, seed, ...)."""
    completion: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    cost_usd: float = 0.0
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    """From the request's ``metadata`` or the ``x-retort-tags`` header."""
    user: str | None = None
    """The request's ``user`` field."""
    record_key: str = msgspec.field(default_factory=lambda: os.urandom(16).hex())
    """Unique per record (a request id may repeat: clients send their own): the database
    keeps one row per key, so writing a record again (spool replay, a retried batch) is a
    no-op."""

    def approx_bytes(self) -> int:
        """A cheap estimate of the record's memory: its text (``sys.getsizeof``, so wide
        characters count at their real width) plus a fixed overhead per record and message."""
        size = _RECORD_OVERHEAD + getsizeof(self.completion)
        if self.prompt is not None:
            size += getsizeof(self.prompt)
        if self.messages:
            for m in self.messages:
                content = m.get("content")
                if isinstance(content, str):
                    size += _MESSAGE_OVERHEAD + getsizeof(content)
                elif content is not None:
                    size += _MESSAGE_OVERHEAD + 2 * len(msgspec.json.encode(content))
                else:
                    size += _MESSAGE_OVERHEAD
        if self.error is not None:
            size += getsizeof(self.error)
        return size
