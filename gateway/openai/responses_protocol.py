"""OpenAI Responses API wire protocol: msgspec Structs, framework-free.

The request (``CreateResponse``) is decoded here; its ``input`` items and ``tools`` stay
plain dicts, checked and translated by :mod:`gateway.openai.responses_convert` (so that
messages without a ``type`` and every item kind get a 400 naming the item, not a decode
error). The response (``Response``), its output items, the streaming events and the
deleted object follow OpenAI's spec: required fields are always present (null where the
spec allows it), optional ones are left out when unset.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.openai.protocol import Metadata, Temperature, TopP

__all__ = [
    "ContentPartAdded",
    "ContentPartDone",
    "DeletedResponse",
    "ErrorEvent",
    "FunctionCall",
    "FunctionCallArgumentsDelta",
    "FunctionCallArgumentsDone",
    "IncompleteDetails",
    "InputTokensDetails",
    "ItemStatus",
    "LogProb",
    "OutputItem",
    "OutputItemAdded",
    "OutputItemDone",
    "OutputMessage",
    "OutputText",
    "OutputTextDelta",
    "OutputTextDone",
    "OutputTokensDetails",
    "Response",
    "ResponseCompleted",
    "ResponseCreated",
    "ResponseError",
    "ResponseEvent",
    "ResponseFailed",
    "ResponseInProgress",
    "ResponseIncomplete",
    "ResponseUsage",
    "ResponsesRequest",
    "TextFormat",
    "TextParam",
    "TopLogProb",
]

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


# ---------------------------------------------------------------- request


class TextFormat(Struct, kw_only=True, omit_defaults=True):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (name, schema, strict)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | UnsetType = UNSET
    description: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class TextParam(Struct, kw_only=True, omit_defaults=True):
    format: TextFormat = msgspec.field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | UnsetType | None = UNSET


class ResponsesRequest(Struct, kw_only=True):
    """``CreateResponse``: every field this gateway acts on, or refuses by name.

    Fields that change the output but cannot be honoured here (``reasoning``,
    ``background``, ``conversation``, ``prompt``, ...) are decoded only so that they can be
    refused with a 400 (see ``responses_convert.REFUSED``); unknown fields are ignored.
    """

    model: str
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=16)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    text: TextParam | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    stream: bool | None = False
    user: str | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Known, output-changing, and not served here: decoded to be refused by name.
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[Any] | None = None
    moderation: dict[str, Any] | None = None


# ---------------------------------------------------------------- response


class TopLogProb(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class LogProb(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogProb]


class OutputText(Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[LogProb] = msgspec.field(default_factory=list)


class OutputMessage(Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCall(Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseError(Struct, kw_only=True):
    code: str
    """One of the spec's ``ResponseErrorCode`` values (``server_error`` here)."""
    message: str


class IncompleteDetails(Struct, kw_only=True):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(Struct, kw_only=True, tag_field="object", tag="response"):
    """``Response``. ``tools`` and ``tool_choice`` echo the request in Responses' shape."""

    id: str
    created_at: int
    status: ResponseStatus
    model: str
    output: list[OutputItem]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: None = None
    store: bool = True
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_logprobs: int | None = None
    text: TextParam = msgspec.field(default_factory=TextParam)
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    background: bool = False
    completed_at: int | None = None
    usage: ResponseUsage | UnsetType = UNSET
    user: str | UnsetType = UNSET


class DeletedResponse(Struct, kw_only=True, tag_field="object", tag="response"):
    """What ``DELETE /v1/responses/{id}`` returns."""

    id: str
    deleted: bool = True


# ---------------------------------------------------------------- streaming events


class ResponseEvent(Struct, kw_only=True, tag_field="type"):
    """A server-sent event of a streamed response; ``sequence_number`` counts from 0."""

    sequence_number: int


class ResponseCreated(ResponseEvent, kw_only=True, tag="response.created"):
    response: Response


class ResponseInProgress(ResponseEvent, kw_only=True, tag="response.in_progress"):
    response: Response


class ResponseCompleted(ResponseEvent, kw_only=True, tag="response.completed"):
    response: Response


class ResponseIncomplete(ResponseEvent, kw_only=True, tag="response.incomplete"):
    response: Response


class ResponseFailed(ResponseEvent, kw_only=True, tag="response.failed"):
    response: Response


class OutputItemAdded(ResponseEvent, kw_only=True, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent, kw_only=True, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ContentPartAdded(ResponseEvent, kw_only=True, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDone(ResponseEvent, kw_only=True, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDelta(ResponseEvent, kw_only=True, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[LogProb] = msgspec.field(default_factory=list)


class OutputTextDone(ResponseEvent, kw_only=True, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[LogProb] = msgspec.field(default_factory=list)


class FunctionCallArgumentsDelta(
    ResponseEvent, kw_only=True, tag="response.function_call_arguments.delta"
):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(
    ResponseEvent, kw_only=True, tag="response.function_call_arguments.done"
):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseEvent, kw_only=True, tag="error"):
    code: str | None
    message: str
    param: str | None
