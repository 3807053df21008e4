"""Streamed chat chunks are assembled from pre-encoded pieces (``gateway.openai.chat``: the
request's ``chunk_head``, cached choices, the token-text template): every frame must be the
very bytes that encoding the whole ``ChatStreamChunk`` struct gives."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from gateway.openai.chat import chunk_head
from gateway.openai.protocol import ChatStreamChoice, ChatStreamChunk, DeltaMessage, encode
from gateway.openai.sse import sse

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.mark.parametrize("model", ["fake-model", 'm "quoted" \\', "héllo 😀"])
@pytest.mark.parametrize(
    "choices",
    [
        [],
        [ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
        [ChatStreamChoice(index=3, delta=DeltaMessage(content='a "b"\n'), finish_reason="stop")],
    ],
)
def test_a_chunk_from_its_head_is_the_structs_bytes(model: str, choices: list[Any]) -> None:
    head = chunk_head("chatcmpl-abc", 1_700_000_000, model)
    assert head is not None
    whole = sse(
        ChatStreamChunk(id="chatcmpl-abc", created=1_700_000_000, model=model, choices=choices)
    )
    assert head + encode(choices) + b"}\n\n" == whole


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 2},
        {"n": 2, "stream_options": {"include_usage": True}},
        {"logprobs": True, "top_logprobs": 2},
        {"stop": ["lazy"]},
        {"max_tokens": 0},
    ],
)
def test_every_streamed_frame_is_the_encoded_struct(
    client: TestClient, extra: dict[str, Any]
) -> None:
    body = {**CHAT, "max_tokens": 6, "stream": True, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    frames = [f for f in r.content.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    decoder = msgspec.json.Decoder(ChatStreamChunk)
    for frame in frames[:-1]:
        chunk = decoder.decode(frame[len(b"data: ") :])
        assert sse(chunk) == frame + b"\n\n"
    texts = [c.delta.content for f in frames[:-1] for c in decoder.decode(f[6:]).choices]
    assert bool("".join(t or "" for t in texts)) == (body["max_tokens"] > 0)
