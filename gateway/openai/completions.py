"""``POST /v1/completions`` (legacy text completions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import post
from litestar.types import Scope

from gateway.errors import UnsupportedParameterError
from gateway.openai.batch import StartedBatch, start_batch
from gateway.openai.lean import LeanRoute
from gateway.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamChunk,
    encode,
)
from gateway.openai.serving import (
    SSEStream,
    Started,
    aggregate,
    request_info,
    sse,
    start,
    stream_events,
)
from gateway.openai.sse import JSONBytes
from gateway.state import Gateway

if TYPE_CHECKING:
    from gateway.engines import base

__all__ = ["completions"]


def _logprobs(entries: list[base.TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        lps.append(e.logprob)
        tops.append(dict(e.top))
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets
    )


@post("/completions", status_code=200, summary="Create a completion", middleware=[LeanRoute])
async def completions(
    data: CompletionRequest, gateway: Gateway, scope: Scope
) -> JSONBytes | SSEStream:
    """OpenAI ``CreateCompletion``: a prompt (text or token ids) or a batch of them, ``n``
    choices each; choice ``k * n + i`` answers prompt ``k``."""
    if (refused := data.refused()) is not None:
        raise UnsupportedParameterError(refused)
    sampling = data.to_sampling()
    prompts = data.prompt_inputs()
    started: Started | StartedBatch
    if len(prompts) == 1:
        info = request_info(gateway, scope, "completions", data, prompt=prompts[0])
        started = await start(gateway, info, data.model, sampling=sampling, id_prefix="cmpl")
    else:
        infos = []
        for k, p in enumerate(prompts):
            info = request_info(gateway, scope, "completions", data, prompt=p)
            if k:
                info.request_id = f"{info.request_id}-{k}"
                info.id_generated = False
            infos.append(info)
        started = await start_batch(gateway, infos, data.model, sampling=sampling, id_prefix="cmpl")
    per_prompt = sampling.n
    sampling = started.sampling
    echoes = [p if data.echo and isinstance(p, str) else "" for p in prompts]

    def echo_of(i: int) -> str:
        return echoes[i // per_prompt]

    want_logprobs = sampling.logprobs is not None

    if not data.stream:
        agg = await aggregate(started)
        body = CompletionResponse(
            id=started.id,
            created=started.created,
            model=data.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=echo_of(i) + agg.text(i),
                    finish_reason=agg.finish[i],
                    logprobs=_logprobs(agg.logprobs[i], len(echo_of(i))) if want_logprobs else None,
                )
                for i in range(sampling.n)
            ],
            usage=agg.usage,
        )
        return JSONBytes(encode(body), started.cost_headers())

    offsets = [len(echo_of(i)) for i in range(sampling.n)]

    def render(c: base.Chunk) -> bytes:
        lp = None
        if want_logprobs:
            lp = _logprobs(c.logprobs or [], offsets[c.index])
            offsets[c.index] += len(c.text)
        return sse(
            CompletionStreamChunk(
                id=started.id,
                created=started.created,
                model=data.model,
                choices=[
                    CompletionStreamChoice(
                        index=c.index, text=c.text, finish_reason=c.finish_reason, logprobs=lp
                    )
                ],
            )
        )

    prologue = [
        sse(
            CompletionStreamChunk(
                id=started.id,
                created=started.created,
                model=data.model,
                choices=[CompletionStreamChoice(index=i, text=echo_of(i), logprobs=None)],
            )
        )
        for i in range(sampling.n)
        if echo_of(i)
    ]
    events = stream_events(
        started,
        render,
        prologue=prologue,
        usage_event=(
            lambda u: sse(
                CompletionStreamChunk(
                    id=started.id, created=started.created, model=data.model, choices=[], usage=u
                )
            )
        )
        if data.include_usage()
        else None,
    )
    return SSEStream(events)
