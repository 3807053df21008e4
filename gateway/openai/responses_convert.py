"""The Responses API over chat completions: requests in, chat bodies out.

A ``CreateResponse`` becomes a :class:`ChatCompletionRequest` (so it is served by the chat
path: routing, limits, metrics, prompt log, adapters and students alike): ``input`` items
become chat messages, ``instructions`` a system message, ``text.format`` the chat
``response_format``, flat function tools the chat's nested ones. The chat completion that
comes back becomes a ``Response`` in :mod:`gateway.openai.responses_output`.

Every output-changing field is honoured or refused with a 400 that names it
(``code: "unsupported_parameter"``): see :data:`REFUSED`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import BadRequestError
from gateway.openai.protocol import ChatCompletionRequest, ChatMessage
from gateway.openai.responses_protocol import (
    OutputItem,
    OutputMessage,
    ResponsesRequest,
)

__all__ = [
    "LOGPROBS_INCLUDE",
    "REFUSED",
    "ChatCall",
    "append_tool_call",
    "chat_param_to_responses",
    "chat_tool_choice",
    "chat_tools",
    "check_refused",
    "input_messages",
    "output_messages",
    "response_format_of",
    "to_chat",
]

LOGPROBS_INCLUDE = "message.output_text.logprobs"
"""The one ``include`` value served: the output text's token logprobs."""

REFUSED: dict[str, str] = {
    "reasoning": "reasoning options are for reasoning models; the served models have none",
    "background": "background responses are not served; use `stream` instead",
    "conversation": "conversations are not served; use `previous_response_id`",
    "prompt": "stored prompt templates are not served",
    "context_management": "context management is not served",
    "moderation": "moderation is not served",
    "truncation": "`truncation: auto` is not served; a too-long input gets a 400",
    "include": f"only `{LOGPROBS_INCLUDE}` can be included",
    "text.verbosity": "verbosity cannot be controlled on the served models",
    "tools": "only `function` tools are served",
    "tool_choice": "only `none`, `auto`, `required`, a function or allowed functions",
}
"""Known output-changing Responses fields (or values) refused with a 400, and why."""

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _unsupported(param: str, message: str | None = None) -> BadRequestError:
    why = message or REFUSED.get(param.split("[", 1)[0], "it is not served here")
    return BadRequestError(
        f"Unsupported parameter: '{param}': {why}.", param=param, code="unsupported_parameter"
    )


def _invalid(param: str, message: str) -> BadRequestError:
    return BadRequestError(message, param=param, code="invalid_value")


def _chat_has(field: str) -> bool:
    """Whether the chat path knows a request field (it serves what it knows)."""
    return field in ChatCompletionRequest.__struct_fields__


def _messages_carry_tool_calls() -> bool:
    return "tool_calls" in ChatMessage.__struct_fields__


def check_refused(req: ResponsesRequest) -> None:
    """400 for each known, output-changing field this gateway cannot honour."""
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise _unsupported("reasoning")
    if req.background:
        raise _unsupported("background")
    for name in ("conversation", "prompt", "context_management", "moderation"):
        if getattr(req, name) is not None:
            raise _unsupported(name)
    if req.truncation == "auto":
        raise _unsupported("truncation")
    for i, value in enumerate(req.include or ()):
        if value != LOGPROBS_INCLUDE:
            raise _unsupported(f"include[{i}]", REFUSED["include"])
    if req.text is not None and req.text.verbosity not in (None, "medium", msgspec.UNSET):
        raise _unsupported("text.verbosity")


# ---------------------------------------------------------------- input -> messages


def _content_text(content: Any, param: str) -> str:
    """A message's content (a string, or text parts) as text; other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(param, f"Invalid '{param}': expected a string or a list of content parts.")
    pieces: list[str] = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _invalid(p, f"Invalid '{p}': expected a content part object.")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{p}.text", f"Invalid '{p}.text': expected a string.")
            pieces.append(text)
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            pieces.append(part["refusal"])
        else:
            raise _unsupported(
                f"{p}.type", f"`{kind}` content is not served: the models read text only"
            )
    return "".join(pieces)


def append_tool_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """Add a chat tool call to the assistant turn that ends ``messages`` (or a new one)."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _str_field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid(
            f"{param}.{name}", f"Missing or invalid '{param}.{name}': expected a string."
        )
    return value


def input_messages(items: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """``input`` as chat messages: message items, ``function_call`` items (folded into the
    assistant turn's ``tool_calls``) and ``function_call_output`` items (``tool`` messages)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise _invalid(param, f"Invalid '{param}': expected at least one item.")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        p = f"{param}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise _invalid(
                    f"{p}.role",
                    f"Invalid '{p}.role': expected one of user, assistant, system, developer.",
                )
            if "content" not in item:
                raise _invalid(f"{p}.content", f"Missing required parameter: '{p}.content'.")
            messages.append(
                {"role": role, "content": _content_text(item["content"], f"{p}.content")}
            )
        elif kind in ("function_call", "function_call_output"):
            if not _messages_carry_tool_calls():
                raise _unsupported(p, "tool calls are not served by the chat path yet")
            call_id = _str_field(item, "call_id", p)
            if kind == "function_call":
                args = item.get("arguments")
                if not isinstance(args, str):
                    raise _invalid(f"{p}.arguments", f"Invalid '{p}.arguments': expected a string.")
                name = _str_field(item, "name", p)
                append_tool_call(
                    messages,
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    },
                )
            else:
                output = _content_text(item.get("output"), f"{p}.output")
                messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise _unsupported(
                f"{p}.type",
                f"`{kind}` items are not served: send messages, function calls and their outputs",
            )
    return messages


def output_messages(output: list[OutputItem]) -> list[dict[str, Any]]:
    """A stored response's output as the chat messages that continue it."""
    messages: list[dict[str, Any]] = []
    for item in output:
        if isinstance(item, OutputMessage):
            messages.append({"role": "assistant", "content": "".join(c.text for c in item.content)})
        else:
            append_tool_call(
                messages,
                {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                },
            )
    return messages


# ---------------------------------------------------------------- tools, format


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' flat function tools as chat's nested ones."""
    out: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        p = f"tools[{j}]"
        kind = tool.get("type")
        if kind != "function":
            raise _unsupported(f"{p}.type", f"only `function` tools are served, not `{kind}`")
        fn: dict[str, Any] = {"name": _str_field(tool, "name", p)}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        if tool.get("parameters") is not None:
            fn["parameters"] = tool["parameters"]
        if tool.get("strict") is not None:
            fn["strict"] = tool["strict"]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(
    choice: str | dict[str, Any], tools: list[dict[str, Any]]
) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
    """The chat ``tool_choice`` and the tools it leaves (``allowed_tools`` filters them)."""
    if isinstance(choice, str):
        return choice, tools
    kind = choice.get("type")
    if kind == "function":
        return {
            "type": "function",
            "function": {"name": _str_field(choice, "name", "tool_choice")},
        }, tools
    if kind == "allowed_tools":
        mode = choice.get("mode")
        if mode not in ("auto", "required"):
            raise _invalid(
                "tool_choice.mode", "Invalid 'tool_choice.mode': expected auto or required."
            )
        allowed: set[str] = set()
        for k, t in enumerate(choice.get("tools") or ()):
            p = f"tool_choice.tools[{k}]"
            if not isinstance(t, dict) or t.get("type") != "function":
                raise _unsupported(p, "only function tools can be allowed")
            allowed.add(_str_field(t, "name", p))
        names = {t["function"]["name"] for t in tools}
        unknown = sorted(allowed - names)
        if unknown:
            raise _invalid("tool_choice.tools", f"Allowed tool `{unknown[0]}` is not in `tools`.")
        return mode, [t for t in tools if t["function"]["name"] in allowed]
    raise _unsupported("tool_choice.type", f"`{kind}` tool choices are not served")


def response_format_of(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is msgspec.UNSET:
        raise _invalid("text.format.name", "Missing required parameter: 'text.format.name'.")
    if fmt.schema is msgspec.UNSET:
        raise _invalid("text.format.schema", "Missing required parameter: 'text.format.schema'.")
    spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
    if fmt.description is not msgspec.UNSET:
        spec["description"] = fmt.description
    if fmt.strict is not msgspec.UNSET and fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


# ---------------------------------------------------------------- request -> chat


@dataclass(slots=True)
class ChatCall:
    """A Responses request translated: the chat request and the context to store."""

    chat: ChatCompletionRequest
    context: list[dict[str, Any]]
    """History plus this input, as chat messages (``instructions`` excluded: they are not
    carried over to the next response)."""


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]] | None = None) -> ChatCall:
    """Translate ``req`` (continuing ``history``) into a chat-completions request."""
    check_refused(req)
    if req.input is None:
        raise _invalid("input", "Missing required parameter: 'input'.")
    context = [*(history or ()), *input_messages(req.input)]
    messages = list(context)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    for src, dst in (
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("metadata", "metadata"),
        ("user", "user"),
    ):
        value = getattr(req, src)
        if value is not None:
            body[dst] = value
    if req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or ()):
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs or 0
    fmt = response_format_of(req)
    if fmt is not None:
        if not _chat_has("response_format"):
            raise _unsupported("text.format", "structured outputs are not served yet")
        body["response_format"] = fmt
    tools = chat_tools(req.tools or [])
    choice = req.tool_choice
    if not tools and choice in ("auto", "none"):
        choice = None  # without tools, the model calls none either way
    if choice is not None:
        if not _chat_has("tool_choice"):
            raise _unsupported("tool_choice", "tool choice is not served yet")
        body["tool_choice"], tools = chat_tool_choice(choice, tools)
    if tools:
        if not _chat_has("tools"):
            raise _unsupported("tools", "function tools are not served yet")
        body["tools"] = tools
        if req.parallel_tool_calls is not None and _chat_has("parallel_tool_calls"):
            body["parallel_tool_calls"] = req.parallel_tool_calls
    try:
        chat = msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"Invalid input: {exc}", param="input") from exc
    return ChatCall(chat=chat, context=context)


_PARAM_MAP = (
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("messages", "input"),
    ("logprobs", "include"),
)


def chat_param_to_responses(param: str | None) -> str | None:
    """A chat request's parameter name (from an error) as the Responses one."""
    if param is None:
        return None
    for chat, resp in _PARAM_MAP:
        if param == chat or param.startswith((chat + ".", chat + "[")):
            return resp if chat == "messages" else resp + param[len(chat) :]
    if param.startswith("tools[") and ".function." in param:
        return param.replace(".function.", ".", 1)
    if param.startswith("tool_choice.function."):
        return "tool_choice." + param[len("tool_choice.function.") :]
    return param
