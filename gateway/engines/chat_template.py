"""Tools and tool round trips for chat templates that do not know them.

Templates that take ``tools`` (Qwen 2.5, Llama 3.1, Hermes, Mistral, ...) get the tools and
the messages as they are, as transformers and vLLM pass them. A template without ``tools``
(SmolLM2's plain ChatML among them) would drop the tools and fail on an assistant message
without content, so for those the tools become a Hermes-style system prompt, assistant tool
calls become ``<tool_call>`` text and tool results ``<tool_response>`` text: the format the
``hermes`` tool-call parser reads back.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["HERMES_SYSTEM", "render_tools", "tool_spec"]

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. For each function call, return a json object with the function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>\n'
    "<tools>\n{tools}\n</tools>"
)


def tool_spec(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as it is rendered: name, description when given, and parameters
    (an empty object schema when none). The one shape for serving and for the log's
    export, so a student is trained on the prompt its teacher saw."""
    f = tool.get("function") or {}
    fn: dict[str, Any] = {
        "name": f.get("name"),
        "parameters": f.get("parameters") or {"type": "object"},
    }
    if f.get("description") is not None:
        fn["description"] = f["description"]
    return {"type": "function", "function": fn}


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", {})
    body = json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments", {})})
    return f"<tool_call>\n{body}\n</tool_call>"


def render_tools(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_takes_tools: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(messages, tools)`` to hand to ``apply_chat_template``."""
    round_trip = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if template_takes_tools or (not tools and not round_trip):
        return messages, tools
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            text = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
        elif m.get("role") == "tool":
            out.append(
                {
                    "role": "tool",
                    "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>",
                }
            )
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if tools:
        prompt = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None
