"""The SSE writer (``gateway.openai.sse``) against a recording ASGI ``send``/``receive``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.engines.base import EngineError, GenerateRequest, Sampling
from gateway.engines.fake import FakeEngine
from gateway.openai.sse import DONE, STALLED, sse, sse_error, write_events


class Source:
    """An SSESource over any async iterator of frames, recording what the writer said."""

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        self._frames = frames
        self.failures: list[Exception] = []
        self.gone = 0
        self.reasons: list[str | None] = []
        self.closed = 0

    def frames(self) -> AsyncIterator[bytes]:
        return self._frames

    def failed(self, exc: Exception) -> None:
        self.failures.append(exc)

    def disconnected(self, reason: str | None = None) -> None:
        self.gone += 1
        self.reasons.append(reason)

    async def aclose(self) -> None:
        self.closed += 1


class Client:
    """ASGI ``send``/``receive``: records body messages; ``leave()`` disconnects."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.sent = asyncio.Event()
        self._gone = asyncio.Event()

    async def send(self, message: Any) -> None:
        self.messages.append(message)
        self.sent.set()

    async def receive(self) -> Any:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self._gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m["body"] for m in self.messages)

    def events(self) -> list[Any]:
        out: list[Any] = []
        for block in self.body.decode().split("\n\n"):
            if block:
                assert block.startswith("data: "), block
                payload = block[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
        return out


async def ready_frames(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield sse({"i": i})


def test_framing() -> None:
    assert sse({"a": "é"}) == b'data: {"a":"\xc3\xa9"}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    err = json.loads(sse_error(EngineError("boom"))[len(b"data: ") :])
    assert err["error"]["message"] == "The engine failed: boom"
    assert set(err["error"]) == {"message", "type", "param", "code"}


async def test_frames_ready_together_go_out_in_one_write_ending_with_done() -> None:
    client, source = Client(), Source(ready_frames(16))
    await write_events(source, client.send, client.receive)
    # All 16 were ready at once: one message, the last one, with [DONE] at its end.
    assert len(client.messages) == 1
    assert client.messages[0]["more_body"] is False
    assert client.events() == [*({"i": i} for i in range(16)), "[DONE]"]
    assert (source.closed, source.gone, source.failures) == (1, 0, [])


async def test_the_first_frame_is_never_held_back() -> None:
    release = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        yield sse({"first": True})
        await release.wait()  # the engine's next step takes a while
        yield sse({"second": True})

    client, source = Client(), Source(frames())
    task = asyncio.create_task(write_events(source, client.send, client.receive))
    await asyncio.wait_for(client.sent.wait(), 5)
    assert client.messages == [
        {"type": "http.response.body", "body": sse({"first": True}), "more_body": True}
    ]
    release.set()
    await asyncio.wait_for(task, 5)
    assert client.events() == [{"first": True}, {"second": True}, "[DONE]"]
    assert client.messages[-1]["more_body"] is False


async def test_writes_are_bounded_in_size() -> None:
    client, source = Client(), Source(ready_frames(100))
    await write_events(source, client.send, client.receive, max_write_bytes=100)
    assert len(client.messages) > 10
    assert all(len(m["body"]) < 100 + 20 for m in client.messages)
    assert client.events()[-1] == "[DONE]"
    assert len(client.events()) == 101


async def test_error_mid_stream_is_an_error_event_then_done() -> None:
    async def frames() -> AsyncIterator[bytes]:
        yield sse({"i": 0})
        await asyncio.sleep(0)
        yield sse({"i": 1})
        raise EngineError("the engine process died")

    client, source = Client(), Source(frames())
    await write_events(source, client.send, client.receive)
    evs = client.events()
    assert evs[:2] == [{"i": 0}, {"i": 1}]
    assert evs[2]["error"]["message"] == "The engine failed: the engine process died"
    assert evs[3] == "[DONE]"
    assert len(evs) == 4
    assert [str(e) for e in source.failures] == ["the engine process died"]
    assert source.closed == 1
    assert client.messages[-1]["more_body"] is False


async def test_no_final_frame_is_lost_after_a_wait() -> None:
    async def frames() -> AsyncIterator[bytes]:
        for i in range(5):
            await asyncio.sleep(0.001)
            yield sse({"i": i})
        yield sse({"usage": 1})  # ready at once after the last token

    client, source = Client(), Source(frames())
    await write_events(source, client.send, client.receive)
    assert client.events() == [*({"i": i} for i in range(5)), {"usage": 1}, "[DONE]"]
    assert client.messages[-1]["more_body"] is False
    assert [m["more_body"] for m in client.messages[:-1]] == [True] * (len(client.messages) - 1)


async def test_client_disconnect_aborts_the_engine_request_at_once() -> None:
    engine = FakeEngine("fake-model", 64, token_delay_s=0.05)
    request = GenerateRequest("req-1", prompt="hi", sampling=Sampling(max_tokens=50))

    async def frames() -> AsyncIterator[bytes]:
        async for c in engine.generate(request):
            yield sse({"text": c.text})

    client, source = Client(), Source(frames())
    task = asyncio.create_task(write_events(source, client.send, client.receive))
    await asyncio.wait_for(client.sent.wait(), 5)  # the first token went out
    client.leave()  # while the engine works on the next one
    await asyncio.wait_for(task, 5)  # returns without raising: the client is gone
    assert engine.aborted == ["req-1"]
    assert (source.gone, source.closed) == (1, 1)
    assert len(client.events()) < 10
    assert all(m["more_body"] for m in client.messages)  # nothing sent after it left


async def test_outside_cancellation_still_closes_the_source() -> None:
    async def frames() -> AsyncIterator[bytes]:
        yield sse({"i": 0})
        await asyncio.sleep(60)
        yield sse({"i": 1})

    client, source = Client(), Source(frames())
    task = asyncio.create_task(write_events(source, client.send, client.receive))
    await asyncio.wait_for(client.sent.wait(), 5)
    task.cancel()  # e.g. the server stops
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (source.gone, source.closed) == (1, 1)


async def test_a_response_that_cannot_start_still_closes_the_source() -> None:
    from gateway.openai.sse import SSEStream

    source = Source(ready_frames(1))
    response = SSEStream(source).to_asgi_response(None, None)  # type: ignore[arg-type]

    async def broken_send(message: Any) -> None:
        raise OSError("the socket is gone")

    client = Client()
    with pytest.raises(OSError, match="socket"):
        await response({"type": "http"}, client.receive, broken_send)  # type: ignore[arg-type]
    assert source.closed == 1


async def test_a_plain_iterator_of_frames_keeps_its_own_done_and_is_closed() -> None:
    from gateway.openai.sse import SSEStream

    closed: list[bool] = []

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield sse({"i": 0})
            await asyncio.sleep(0)
            yield DONE
        finally:
            closed.append(True)

    response = SSEStream(frames()).to_asgi_response(None, None)  # type: ignore[arg-type]
    client = Client()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await client.send(message)

    await response({"type": "http"}, client.receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start"
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert b"content-length" not in headers
    assert client.events() == [{"i": 0}, "[DONE]"]  # one [DONE], the iterator's
    assert closed == [True]


class StuckClient(Client):
    """A client that stops reading after ``reads`` messages: later sends wait (as the
    server's ``send`` does once the socket's buffers are full)."""

    def __init__(self, reads: int) -> None:
        super().__init__()
        self.reads = reads

    async def send(self, message: Any) -> None:
        if len(self.messages) >= self.reads:
            await asyncio.Event().wait()  # never resumes
        await super().send(message)


async def test_a_client_that_stops_reading_is_cut_after_the_stall() -> None:
    engine = FakeEngine("fake-model", 10_000, token_delay_s=0.01)
    request = GenerateRequest("req-stuck", prompt="hi", sampling=Sampling(max_tokens=5000))

    async def frames() -> AsyncIterator[bytes]:
        async for c in engine.generate(request):
            yield sse({"text": c.text})

    client, source = StuckClient(reads=2), Source(frames())
    stalls: list[int] = []
    await asyncio.wait_for(
        write_events(
            source, client.send, client.receive, stall_s=0.2, on_stall=lambda: stalls.append(1)
        ),
        5,
    )
    assert engine.aborted == ["req-stuck"]  # the engine request was aborted
    assert engine.running == 0
    assert (source.gone, source.closed, source.reasons) == (1, 1, [STALLED])
    assert stalls == [1]
    assert len(client.messages) == 2


async def test_a_slow_send_that_completes_is_not_a_stall() -> None:
    class SlowClient(Client):
        async def send(self, message: Any) -> None:
            await asyncio.sleep(0.05)  # waits, but well within the stall bound
            await super().send(message)

    client, source = SlowClient(), Source(ready_frames(3))
    await write_events(source, client.send, client.receive, stall_s=1.0, max_write_bytes=1)
    assert client.events() == [{"i": 0}, {"i": 1}, {"i": 2}, "[DONE]"]
    assert (source.gone, source.closed) == (0, 1)


@pytest.mark.parametrize(
    "text", ["", "Hello", ' "quoted" \\ back', "line\nbreak\ttab", "\x00\x1f ctl", "héllo 😀", "}]"]
)
def test_text_template_is_the_same_bytes_as_encoding_the_struct(text: str) -> None:
    from gateway.openai.protocol import ChatStreamChoice, ChatStreamChunk, DeltaMessage, encode
    from gateway.openai.sse import text_template

    def frame(t: str) -> bytes:
        choice = ChatStreamChoice(index=0, delta=DeltaMessage(content=t))
        return sse(ChatStreamChunk(id="chatcmpl-x", created=1, model='m "q"', choices=[choice]))

    template = text_template(frame)
    assert template is not None
    head, tail = template
    assert head + encode(text) + tail == frame(text)
    json.loads((head + encode(text) + tail)[len(b"data: ") :])


def test_text_template_refuses_an_ambiguous_cut() -> None:
    from gateway.openai.sse import text_template

    assert text_template(lambda t: sse({"a": t, "b": t})) is None


async def _asgi_messages(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    await app({"type": "http"}, receive, send)
    return sent


async def test_json_bytes_sends_what_litestar_response_sends() -> None:
    from litestar import Response

    from gateway.openai.sse import JSONBytes

    body, headers = b'{"id":"x","v":"\xc3\xa9"}', {"X-Retort-Cost-USD": "0.0001"}
    fast = await _asgi_messages(JSONBytes(body, headers).to_asgi_response(None, None))  # type: ignore[arg-type]
    plain = Response(body, media_type="application/json", headers=headers)
    slow = await _asgi_messages(plain.to_asgi_response(None, None))  # type: ignore[arg-type]
    assert fast[0]["status"] == slow[0]["status"] == 200
    assert sorted(fast[0]["headers"]) == sorted(slow[0]["headers"])
    assert [m.get("body") for m in fast[1:]] == [m.get("body") for m in slow[1:]] == [body]


async def test_json_bytes_falls_back_when_a_layer_adds_headers() -> None:
    from gateway.openai.sse import JSONBytes

    resp = JSONBytes(b"{}").to_asgi_response(None, None, headers={"x-layer": "1"})  # type: ignore[arg-type]
    sent = await _asgi_messages(resp)
    assert (b"x-layer", b"1") in sent[0]["headers"]


@pytest.mark.parametrize("headers", [None, {"X-Retort-Cost-USD": "0.1"}])
def test_json_bytes_and_sse_stream_hold_what_litestars_response_holds(
    headers: dict[str, str] | None,
) -> None:
    """They set Response's fields themselves (cheaper): every field, as Litestar sets it."""
    from litestar import Response

    from gateway.openai.sse import JSONBytes, SSEStream

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    json_response = Response(b"{}", media_type="application/json", headers=headers)
    sse_response = Response(b"", media_type="text/event-stream", headers=sse_headers)
    pairs = [(JSONBytes(b"{}", headers), json_response), (SSEStream(ready_frames(0)), sse_response)]
    for ours, litestars in pairs:
        for name in Response.__slots__:
            assert getattr(ours, name) == getattr(litestars, name), name


async def test_sse_stream_headers_own_and_added_by_a_layer() -> None:
    from gateway.openai.sse import SSEStream

    own = [
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    lean = await _asgi_messages(SSEStream(ready_frames(1)).asgi())
    assert lean[0]["headers"] == own
    # A plain iterator of frames brings its own [DONE] (this one has none).
    assert b"".join(m.get("body", b"") for m in lean[1:]) == sse({"i": 0})
    layered = await _asgi_messages(
        SSEStream(ready_frames(1)).to_asgi_response(None, None, headers={"X-Layer": "1"})  # type: ignore[arg-type]
    )
    assert sorted(layered[0]["headers"]) == sorted([*own, (b"x-layer", b"1")])
