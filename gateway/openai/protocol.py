"""OpenAI wire protocol: msgspec Structs, framework-free.

Past ~400 lines on purpose: declarations with almost no logic, in the one file DESIGN.md
names for the chat, completions and models wire shapes.

Requests are validated by msgspec on decode (types, ranges, roles). Unknown fields are
ignored. Each request converts itself to engine-level :class:`~gateway.engines.base.Sampling`.
Responses follow ``CreateChatCompletionResponse``, ``CreateChatCompletionStreamResponse``,
``CreateCompletionResponse`` and ``ListModelsResponse`` in OpenAI's spec: optional fields
are left out rather than sent as a null the schema does not allow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from gateway.engines.base import OutputConstraint, Sampling

__all__ = [
    "REFUSED_FIELDS",
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
    "DeltaFunction",
    "DeltaMessage",
    "DeltaToolCall",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "FunctionDef",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "JsonSchemaResponseFormat",
    "ModelCard",
    "ModelList",
    "NamedToolChoice",
    "ParamError",
    "PromptError",
    "ResponseFormat",
    "ResponseMessage",
    "SamplingFields",
    "StreamOptions",
    "TextFormat",
    "TokenLogprob",
    "ToolCall",
    "ToolChoice",
    "ToolDef",
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
    """One part of a message's content. A text-only model reads text parts; any other
    part (an image, audio, a file) is refused rather than dropped."""

    type: str
    text: str | None = None


TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal"})

FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
"""OpenAI's rule for function and response-format names."""


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str
    """JSON, as the model generated it."""


class ToolCall(Struct, kw_only=True):
    """``ChatCompletionMessageToolCall``: in an assistant message or a response."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in TEXT_PARTS)


class FunctionDef(Struct, kw_only=True):
    """``FunctionObject``."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Struct, kw_only=True):
    """``ChatCompletionTool``: only function tools exist for a self-hosted model."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    """``ChatCompletionNamedToolChoice``: force a call of this function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(Struct, kw_only=True, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(Struct, kw_only=True, tag_field="type", tag="json_object"):
    pass


class JsonSchemaResponseFormat(Struct, kw_only=True, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaFormat


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaResponseFormat
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=300)]


class SamplingFields(Struct, kw_only=True):
    """The sampling fields chat and completions share."""

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
    logit_bias: LogitBias | None = None
    """Token id (as a string) -> bias in [-100, 100], added to the logits."""
    user: str | None = None
    metadata: Metadata | None = None
    ignore_eos: bool | None = None
    """vLLM's extension: generate exactly ``max_tokens`` (benchmarks at equal lengths)."""
    min_tokens: NonNegInt | None = None
    """vLLM's extension: no end of the answer before this many tokens."""

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def token_bias(self) -> dict[int, float] | None:
        """``logit_bias`` keyed by token id; raises :class:`ParamError` for a bad key."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            try:
                tid = int(key)
            except ValueError:
                raise ParamError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
            if tid < 0:
                raise ParamError(f"logit_bias token id {tid} is negative", param="logit_bias")
            out[tid] = float(bias)
        return out

    def refused(self) -> str | None:
        """The first field set that changes the output and that this gateway does not
        honour (see :data:`REFUSED_FIELDS`); ``None`` when there is none."""
        return None

    def _sampling(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        constraint: OutputConstraint | None = None,
    ) -> Sampling:
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
            logit_bias=self.token_bias(),
            constraint=constraint,
            ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens or 0,
        )


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """``CreateChatCompletionRequest``: the fields this gateway acts on, and the ones it
    refuses (typed ``Any`` here only so that they are seen, never ignored)."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Known fields that change the output and are not honoured: refused (REFUSED_FIELDS).
    audio: Any = None
    modalities: list[str] | None = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    def refused(self) -> str | None:
        for name in REFUSED_FIELDS["chat"]:
            value = getattr(self, name)
            if name == "modalities":
                if value and any(m != "text" for m in value):
                    return name
            elif value is not None:
                return name
        return None

    def budget(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def to_sampling(self, constraint: OutputConstraint | None = None) -> Sampling:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.budget(), k, constraint)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them: text content, and for tool round trips
        the assistant's ``tool_calls`` (arguments parsed) and the tool's ``tool_call_id``.
        Raises :class:`ParamError` for non-text content or arguments that are not JSON."""
        out: list[dict[str, Any]] = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type not in TEXT_PARTS:
                        raise ParamError(
                            f"content parts of type {part.type!r} are not supported: "
                            "this model reads text only",
                            param=f"messages[{i}].content[{j}].type",
                        )
            msg: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise ParamError(
                        "a message with role 'tool' needs a tool_call_id",
                        param=f"messages[{i}].tool_call_id",
                    )
                msg["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                calls = []
                for j, call in enumerate(m.tool_calls):
                    try:
                        args = msgspec.json.decode(call.function.arguments or "{}")
                    except msgspec.DecodeError:
                        raise ParamError(
                            "tool call arguments must be JSON",
                            param=f"messages[{i}].tool_calls[{j}].function.arguments",
                        ) from None
                    calls.append(
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.function.name, "arguments": args},
                        }
                    )
                msg["tool_calls"] = calls
            out.append(msg)
        return out


class CompletionRequest(SamplingFields, kw_only=True):
    """``CreateCompletionRequest``: one prompt string (or one token list)."""

    prompt: str | Annotated[list[Any], Meta(min_length=1)]
    """A string, a list of token ids, or a batch: a list of strings or of token-id lists."""
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = False
    max_tokens: NonNegInt | None = 16
    suffix: str | None = None
    best_of: int | None = None

    def refused(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of"
        return None

    def to_sampling(self) -> Sampling:
        return self._sampling(self.max_tokens, self.logprobs)

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts: one for a string or a token list, several for a batch. Raises
        :class:`PromptError` for mixed or malformed lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(_is_token(t) for t in p):
            return [[int(t) for t in p]]
        if len(p) > MAX_BATCH_PROMPTS:
            raise PromptError(f"a batch holds at most {MAX_BATCH_PROMPTS} prompts, got {len(p)}")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in p):
            return [[int(t) for t in x] for x in p]
        raise PromptError(
            "`prompt` must be a string, a list of token ids, a list of strings, "
            "or a list of token-id lists"
        )


MAX_BATCH_PROMPTS = 64
"""Prompts in one batched completion request (each is an engine request)."""


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class PromptError(ValueError):
    """The ``prompt`` field has a shape this gateway does not serve."""


class ParamError(ValueError):
    """A field's value is well-typed but unusable (HTTP 400 naming ``param``)."""

    def __init__(self, message: str, *, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


REFUSED_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": (
        "audio",
        "modalities",
        "functions",
        "function_call",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
    ),
    "completions": ("suffix", "best_of"),  # best_of only when it differs from n
}
"""OpenAI request fields that change the output and that this gateway does not honour.
A request that sets one gets a 400 (``code: unsupported_parameter``) naming it; every other
output-changing field is honoured (README, "Never silently ignored")."""


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
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    """Left out when the model called no tool (the spec allows no null)."""


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


class DeltaFunction(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Struct, kw_only=True, omit_defaults=True):
    """``ChatCompletionMessageToolCallChunk``: the first fragment of a call carries its id,
    type and name; the arguments fragments concatenate to JSON."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class DeltaMessage(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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

encode: Callable[[Any], bytes] = _encoder.encode
"""Encode a response struct to JSON bytes (the encoder's bound method: called per token)."""
