"""``POST /v1/chat/completions``."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from litestar import post
from litestar.types import Scope

from gateway.errors import UnsupportedParameterError
from gateway.openai.lean import LeanRoute
from gateway.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatStreamChunk,
    DeltaMessage,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    encode,
)
from gateway.openai.serving import (
    SSEStream,
    aggregate,
    request_info,
    sse,
    start,
    stream_events,
)
from gateway.openai.sse import JSONBytes, text_template
from gateway.openai.tools import OutputPlan, ToolStream, plan_output
from gateway.state import Gateway

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.engines import base
    from gateway.openai.protocol import Usage

__all__ = ["chat_completions", "chunk_head"]


def _chat_logprobs(entries: list[base.TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


@post(
    "/chat/completions",
    status_code=200,
    summary="Create a chat completion",
    middleware=[LeanRoute],
)
async def chat_completions(
    data: ChatCompletionRequest, gateway: Gateway, scope: Scope
) -> JSONBytes | SSEStream:
    """OpenAI ``CreateChatCompletion``, rendered with the model's own chat template;
    ``response_format`` and ``tools`` as :mod:`gateway.openai.tools` plans them."""
    if (refused := data.refused()) is not None:
        raise UnsupportedParameterError(refused)
    plan = plan_output(data, gateway.settings.model.tool_call_parser)
    sampling = data.to_sampling(plan.constraint)
    info = request_info(gateway, scope, "chat", data, messages=data.chat_messages())
    started = await start(
        gateway, info, data.model, sampling=sampling, id_prefix="chatcmpl", tools=plan.tools
    )
    want_logprobs = sampling.logprobs is not None

    def failed_output() -> None:
        if gateway.metrics is not None:
            gateway.metrics.structured_output_failed(started.model, plan.json_kind or "tool_call")

    if not data.stream:
        agg = await aggregate(started)
        choices = []
        for i in range(sampling.n):
            parsed, finish = plan.finish(agg.text(i), agg.finish[i])
            if not parsed.valid:
                failed_output()
            message = ResponseMessage(content=parsed.content)
            if parsed.tool_calls:
                message.tool_calls = parsed.tool_calls
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,
                    logprobs=_chat_logprobs(agg.logprobs[i]) if want_logprobs else None,
                )
            )
        body = ChatCompletionResponse(
            id=started.id,
            created=started.created,
            model=data.model,
            choices=choices,
            usage=agg.usage,
        )
        return JSONBytes(encode(body), started.cost_headers())

    head = chunk_head(started.id, started.created, data.model)

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        if usage is None and head is not None:
            return head + encode(choices) + b"}\n\n"
        return sse(
            ChatStreamChunk(
                id=started.id,
                created=started.created,
                model=data.model,
                choices=choices,
                usage=usage,
            )
        )

    if head is not None:
        prologue = [head + _role_choices(i) + b"}\n\n" for i in range(sampling.n)]
    else:
        prologue = [chunk(_role_choice(i)) for i in range(sampling.n)]
    if plan.mode == "text":
        render = _plain_render(chunk, want_logprobs, head)
    else:
        render = _tool_render(chunk, plan, sampling.n, failed_output)
    events = stream_events(
        started,
        render,
        prologue=prologue,
        usage_event=(lambda u: chunk([], u)) if data.include_usage() else None,
    )
    return SSEStream(events)


def chunk_head(response_id: str, created: int, model: str) -> bytes | None:
    """``data: {...,"choices":`` of a stream's chunks, so that a chunk without usage is
    this head, its encoded choices and ``}\n\n`` (the same bytes as encoding the whole
    :class:`ChatStreamChunk`, a unit test holds them equal); ``None`` if the encoder ever
    stops writing ``choices`` last."""
    whole = encode(ChatStreamChunk(id=response_id, created=created, model=model, choices=[]))
    if not whole.endswith(b'"choices":[]}'):
        return None
    return b"data: " + whole[:-3]


def _role_choice(i: int) -> list[ChatStreamChoice]:
    return [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]


@functools.cache
def _role_choices(i: int) -> bytes:
    """The encoded choices of choice ``i``'s first chunk (the same for every request)."""
    return encode(_role_choice(i))


@functools.cache
def _text_choices() -> tuple[bytes, bytes] | None:
    """Choice 0's encoded choices around a token's text (the same for every request)."""
    return text_template(
        lambda text: encode([ChatStreamChoice(index=0, delta=DeltaMessage(content=text))])
    )


def _plain_render(
    chunk: Callable[[list[ChatStreamChoice]], bytes],
    want_logprobs: bool,
    head: bytes | None = None,
) -> Callable[[base.Chunk], bytes]:
    def render(c: base.Chunk) -> bytes:
        return chunk(
            [
                ChatStreamChoice(
                    index=c.index,
                    delta=DeltaMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=_chat_logprobs(c.logprobs or []) if want_logprobs else None,
                )
            ]
        )

    if want_logprobs:
        return render
    # The common frame (choice 0, not the last, no logprobs) is a pre-encoded template
    # around the token's text: one string encoded per token instead of three structs.
    if head is not None and (choices := _text_choices()) is not None:
        template: tuple[bytes, bytes] | None = (head + choices[0], choices[1] + b"}\n\n")
    else:
        template = text_template(
            lambda text: chunk([ChatStreamChoice(index=0, delta=DeltaMessage(content=text))])
        )
    if template is None:
        return render
    before, after = template

    def render_text(c: base.Chunk) -> bytes:
        if c.index == 0 and c.finish_reason is None:
            return before + encode(c.text) + after
        return render(c)

    return render_text


def _tool_render(
    chunk: Callable[[list[ChatStreamChoice]], bytes],
    plan: OutputPlan,
    n: int,
    failed_output: Callable[[], None],
) -> Callable[[base.Chunk], bytes]:
    """Stream choices through :class:`ToolStream`: a chunk may yield no event (text held
    back), one, or, at the end of a choice, the calls and then the finish."""
    streams = [ToolStream(plan) for _ in range(n)]

    def render(c: base.Chunk) -> bytes:
        ts = streams[c.index]
        out = b""
        content, calls = ts.feed(c.text)
        if content is not None or calls:
            out += chunk(
                [
                    ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=content, tool_calls=calls)
                    )
                ]
            )
        if c.finish_reason is not None:
            rest, final_calls, finish, valid = ts.finish(c.finish_reason)
            if not valid:
                failed_output()
            if rest is not None or final_calls:
                out += chunk(
                    [
                        ChatStreamChoice(
                            index=c.index,
                            delta=DeltaMessage(content=rest, tool_calls=final_calls or None),
                        )
                    ]
                )
            out += chunk(
                [ChatStreamChoice(index=c.index, delta=DeltaMessage(), finish_reason=finish)]
            )
        return out

    return render
