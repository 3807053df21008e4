"""OpenAI wire protocol: msgspec Structs, framework-free.

Requests are validated by msgspec on decode (types, ranges, roles). Unknown fields are
ignored. Each request converts itself to engine-level :class:`~gateway.engines.base.Sampling`.
Responses follow ``CreateChatCompletionResponse``, ``CreateChatCompletionStreamResponse``,
``CreateCompletionResponse`` and ``ListModelsResponse`` in OpenAI's spec: optional fields
are left out rather than sent as a null the schema does not allow.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.engines.base import Sampling

__all__ = [
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprobs",
    "ChatMessage",
    "ChatStreamChoice",
    "ChatStreamChunk",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamChoice",
    "CompletionStreamChunk",
    "ContentPart",
    "DeltaMessage",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "PromptError",
    "ResponseMessage",
    "StreamOptions",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]

NonNegInt = Annotated[int, Meta(ge=0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
N = Annotated[int, Meta(ge=1, le=128)]
Stop = str | Annotated[list[str], Meta(max_length=4)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# OpenAI's Metadata: up to 16 string pairs.
Metadata = Annotated[dict[str, str], Meta(max_length=16)]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


class ContentPart(Struct, kw_only=True):
    """One part of a message's content. Only text parts reach a text-only model."""

    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))


class _SamplingFields(Struct, kw_only=True):
    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: N | None = 1
    max_tokens: NonNegInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    metadata: Metadata | None = None
    ignore_eos: bool | None = None
    """vLLM's extension: generate exactly ``max_tokens`` (benchmarks at equal lengths)."""
    min_tokens: NonNegInt | None = None
    """vLLM's extension: no end of the answer before this many tokens."""

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            n=self.n or 1,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
        )


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """``CreateChatCompletionRequest``: the fields this gateway acts on."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None

    def to_sampling(self) -> Sampling:
        budget = self.max_completion_tokens
        if budget is None:
            budget = self.max_tokens
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(budget, k)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields, kw_only=True):
    """``CreateCompletionRequest``: one prompt string (or one token list)."""

    prompt: str | Annotated[list[str | int], Meta(min_length=1)]
    """A string, a one-string list, or a list of token ids. Batches are not supported."""
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = False
    max_tokens: NonNegInt | None = 16

    def to_sampling(self) -> Sampling:
        return self._sampling(self.max_tokens, self.logprobs)

    def prompt_input(self) -> str | list[int]:
        """The single prompt; raises ``ValueError`` for batches or mixed lists."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if all(isinstance(t, int) for t in p):
            return [int(t) for t in p]
        if len(p) == 1 and isinstance(p[0], str):
            return p[0]
        raise PromptError(
            "`prompt` must be a string, a list holding one string, or a list of token ids; "
            "batched prompts are not supported: send one request per prompt"
        )


class PromptError(ValueError):
    """The ``prompt`` field has a shape this gateway does not serve."""


# ---------------------------------------------------------------- responses


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(
    Struct, kw_only=True, omit_defaults=True, tag_field="object", tag="chat.completion"
):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatStreamChunk(
    Struct, kw_only=True, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"
):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(
    Struct, kw_only=True, omit_defaults=True, tag_field="object", tag="text_completion"
):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionStreamChoice(Struct, kw_only=True, omit_defaults=True):
    """A streamed choice: ``finish_reason`` is left out until the last chunk, since the
    spec's ``CreateCompletionResponse`` allows no null there."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None = None


class CompletionStreamChunk(
    Struct, kw_only=True, omit_defaults=True, tag_field="object", tag="text_completion"
):
    """A streamed chunk: the same shape as :class:`CompletionResponse` (as in OpenAI's API)."""

    id: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class ModelCard(Struct, kw_only=True, omit_defaults=True, tag_field="object", tag="model"):
    id: str
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
    max_model_len: int | None = None


class ModelList(Struct, kw_only=True, tag_field="object", tag="list"):
    data: list[ModelCard]


class ErrorBody(Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct, kw_only=True):
    error: ErrorBody


_encoder = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    """Encode a response struct to JSON bytes."""
    return _encoder.encode(obj)
