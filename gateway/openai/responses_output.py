"""The Responses API over chat completions: chat bodies in, ``Response`` objects out.

:func:`skeleton` is the response as it starts (echoing the request); a chat completion body
fills it (:func:`response_from_chat`), and the streaming path
(:mod:`gateway.openai.responses_stream`) builds its events from the same pieces
(:func:`logprobs_from_chat`, :func:`usage_from_chat`, :func:`finish`). The request side is
:mod:`gateway.openai.responses_convert`.
"""

from __future__ import annotations

import uuid
from typing import Any

from gateway.openai.responses_protocol import (
    FunctionCall,
    IncompleteDetails,
    ItemStatus,
    LogProb,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponsesRequest,
    ResponseUsage,
    TopLogProb,
)

__all__ = [
    "finish",
    "logprobs_from_chat",
    "new_id",
    "response_from_chat",
    "skeleton",
    "usage_from_chat",
]


def new_id(prefix: str) -> str:
    """An id like OpenAI's: a prefix (``resp``, ``msg``, ``fc``, ``call``) and 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


def skeleton(req: ResponsesRequest, response_id: str, created_at: int, *, store: bool) -> Response:
    """The response as it starts (``in_progress``, no output), echoing the request."""
    tools = [
        {
            "type": "function",
            "name": t.get("name"),
            "description": t.get("description"),
            "parameters": t.get("parameters"),
            "strict": t.get("strict"),
        }
        for t in req.tools or ()
    ]
    resp = Response(
        id=response_id,
        created_at=created_at,
        status="in_progress",
        model=req.model,
        output=[],
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        metadata=dict(req.metadata or {}),
        parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=req.previous_response_id,
        store=store,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_logprobs=req.top_logprobs,
        tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
        tools=tools,
    )
    if req.text is not None:
        resp.text = req.text
    if req.user is not None:
        resp.user = req.user
    return resp


def usage_from_chat(usage: dict[str, Any] | None) -> ResponseUsage:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return ResponseUsage(
        input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
    )


def logprobs_from_chat(logprobs: dict[str, Any] | None) -> list[LogProb]:
    """Chat ``choices[].logprobs`` (or a stream delta's) as output-text logprobs."""
    return [
        LogProb(
            token=e["token"],
            logprob=e["logprob"],
            bytes=e.get("bytes") or list(e["token"].encode()),
            top_logprobs=[
                TopLogProb(
                    token=t["token"],
                    logprob=t["logprob"],
                    bytes=t.get("bytes") or list(t["token"].encode()),
                )
                for t in e.get("top_logprobs") or ()
            ],
        )
        for e in (logprobs or {}).get("content") or ()
    ]


def finish(resp: Response, finish_reason: str | None, completed_at: int) -> None:
    """Set the final status from the chat ``finish_reason`` (``length`` -> incomplete)."""
    if finish_reason == "length":
        resp.status = "incomplete"
        resp.incomplete_details = IncompleteDetails(reason="max_output_tokens")
    else:
        resp.status = "completed"
        resp.completed_at = completed_at


def response_from_chat(chat: dict[str, Any], resp: Response, completed_at: int) -> Response:
    """Fill ``resp`` (a :func:`skeleton`) from a chat completion body."""
    choice = chat["choices"][0]
    message = choice.get("message") or {}
    finish_reason = choice.get("finish_reason")
    item_status: ItemStatus = "incomplete" if finish_reason == "length" else "completed"
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    output: list[OutputItem] = []
    if text or not calls:
        output.append(
            OutputMessage(
                id=new_id("msg"),
                status=item_status,
                content=[
                    OutputText(text=text, logprobs=logprobs_from_chat(choice.get("logprobs")))
                ],
            )
        )
    for call in calls:
        fn = call.get("function") or {}
        output.append(
            FunctionCall(
                id=new_id("fc"),
                call_id=call.get("id") or new_id("call"),
                name=fn.get("name") or "",
                arguments=fn.get("arguments") or "",
                status=item_status,
            )
        )
    resp.output = output
    resp.usage = usage_from_chat(chat.get("usage"))
    finish(resp, finish_reason, completed_at)
    return resp
