"""``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Request, Response, post

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
from gateway.state import Gateway

if TYPE_CHECKING:
    from gateway.engines import base
    from gateway.openai.protocol import Usage

__all__ = ["chat_completions"]


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


@post("/chat/completions", status_code=200, summary="Create a chat completion")
async def chat_completions(
    data: ChatCompletionRequest, gateway: Gateway, request: Request[Any, Any, Any]
) -> Response[bytes] | SSEStream:
    """OpenAI ``CreateChatCompletion``, rendered with the model's own chat template."""
    sampling = data.to_sampling()
    info = request_info(gateway, request, "chat", data, messages=data.chat_messages())
    started = await start(gateway, info, data.model, sampling=sampling, id_prefix="chatcmpl")
    want_logprobs = sampling.logprobs is not None

    if not data.stream:
        agg = await aggregate(started)
        body = ChatCompletionResponse(
            id=started.id,
            created=started.created,
            model=data.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ResponseMessage(content=agg.text(i)),
                    finish_reason=agg.finish[i],
                    logprobs=_chat_logprobs(agg.logprobs[i]) if want_logprobs else None,
                )
                for i in range(sampling.n)
            ],
            usage=agg.usage,
        )
        return Response(encode(body), media_type="application/json", headers=started.cost_headers())

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        return sse(
            ChatStreamChunk(
                id=started.id,
                created=started.created,
                model=data.model,
                choices=choices,
                usage=usage,
            )
        )

    prologue = [
        chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(sampling.n)
    ]
    events = stream_events(
        started,
        lambda c: chunk(
            [
                ChatStreamChoice(
                    index=c.index,
                    delta=DeltaMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=_chat_logprobs(c.logprobs or []) if want_logprobs else None,
                )
            ]
        ),
        prologue=prologue,
        usage_event=(lambda u: chunk([], u)) if data.include_usage() else None,
    )
    return SSEStream(events)
