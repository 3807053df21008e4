"""The Responses streaming events, made from the chat-completions stream.

:class:`EventEncoder` takes the chat chunks (decoded JSON objects) one by one and returns
OpenAI's events as SSE bytes, numbered by ``sequence_number`` from 0::

    response.created, response.in_progress,
    response.output_item.added (message), response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done,
    response.output_item.added (function_call), response.function_call_arguments.delta ...,
    response.function_call_arguments.done, response.output_item.done,
    response.completed | response.incomplete | (error, response.failed)

:func:`chat_sse_objects` parses the chat SSE byte stream back into those chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.openai.responses_output import (
    finish,
    logprobs_from_chat,
    new_id,
    usage_from_chat,
)
from gateway.openai.responses_protocol import (
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCall,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    ItemStatus,
    LogProb,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseEvent,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["EventEncoder", "chat_sse_objects", "event_bytes"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def event_bytes(event: ResponseEvent) -> bytes:
    """One SSE event, named as OpenAI names it (``event: <type>``)."""
    kind = type(event).__struct_config__.tag
    assert isinstance(kind, str)
    return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


async def chat_sse_objects(stream: AsyncIterable[bytes | str]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a chat SSE stream (``data: {...}`` events), up to ``[DONE]``."""
    buf = b""
    async for piece in stream:
        buf += piece.encode() if isinstance(piece, str) else piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield _decoder.decode(data)


@dataclass(slots=True)
class _Message:
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    logprobs: list[LogProb] = field(default_factory=list)
    open: bool = True

    def item(self, status: ItemStatus) -> OutputMessage:
        return OutputMessage(
            id=self.id,
            status=status,
            content=[OutputText(text="".join(self.text), logprobs=list(self.logprobs))],
        )


@dataclass(slots=True)
class _Call:
    index: int
    id: str
    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    open: bool = True

    def item(self, status: ItemStatus) -> FunctionCall:
        return FunctionCall(
            id=self.id,
            call_id=self.call_id,
            name=self.name,
            arguments="".join(self.arguments),
            status=status,
        )


@dataclass(slots=True)
class EventEncoder:
    """Turns chat chunks into Responses events for one response (``response`` is the
    :func:`~gateway.openai.responses_output.skeleton`, filled in as the stream goes)."""

    response: Response
    seq: int = 0
    items: list[_Message | _Call] = field(default_factory=list)
    message: _Message | None = None
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def _emit(self, cls: type[ResponseEvent], **fields: Any) -> bytes:
        event = cls(sequence_number=self.seq, **fields)
        self.seq += 1
        return event_bytes(event)

    def start(self) -> list[bytes]:
        snapshot = msgspec.structs.replace(self.response, output=[])
        return [
            self._emit(ResponseCreated, response=snapshot),
            self._emit(ResponseInProgress, response=snapshot),
        ]

    # -- items ----------------------------------------------------------------------------

    def _open_message(self, out: list[bytes]) -> _Message:
        if self.message is not None and self.message.open:
            return self.message
        msg = _Message(index=len(self.items), id=new_id("msg"))
        self.items.append(msg)
        self.message = msg
        added = OutputMessage(id=msg.id, status="in_progress", content=[])
        out.append(self._emit(OutputItemAdded, output_index=msg.index, item=added))
        part = OutputText(text="")
        out.append(
            self._emit(
                ContentPartAdded, item_id=msg.id, output_index=msg.index, content_index=0, part=part
            )
        )
        return msg

    def _close(self, item: _Message | _Call, status: ItemStatus, out: list[bytes]) -> None:
        if not item.open:
            return
        item.open = False
        done: OutputItem
        if isinstance(item, _Message):
            done = item.item(status)
            part = done.content[0]
            common = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            out.append(self._emit(OutputTextDone, text=part.text, logprobs=part.logprobs, **common))
            out.append(self._emit(ContentPartDone, part=part, **common))
        else:
            done = item.item(status)
            out.append(
                self._emit(
                    FunctionCallArgumentsDone,
                    item_id=item.id,
                    output_index=item.index,
                    name=item.name,
                    arguments=done.arguments,
                )
            )
        out.append(self._emit(OutputItemDone, output_index=item.index, item=done))

    def _tool_delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        k = int(delta.get("index") or 0)
        fn = delta.get("function") or {}
        call = self.calls.get(k)
        if call is None:
            if self.message is not None:
                self._close(self.message, "completed", out)
            call = _Call(
                index=len(self.items),
                id=new_id("fc"),
                call_id=delta.get("id") or new_id("call"),
                name=fn.get("name") or "",
            )
            self.items.append(call)
            self.calls[k] = call
            out.append(
                self._emit(OutputItemAdded, output_index=call.index, item=call.item("in_progress"))
            )
        args = fn.get("arguments")
        if args:
            call.arguments.append(args)
            out.append(
                self._emit(
                    FunctionCallArgumentsDelta, item_id=call.id, output_index=call.index, delta=args
                )
            )

    # -- the chat stream ------------------------------------------------------------------

    def chunk(self, obj: dict[str, Any]) -> list[bytes]:
        """Events for one chat chunk (text and tool-call deltas, finish, usage)."""
        out: list[bytes] = []
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            logprobs = logprobs_from_chat(choice.get("logprobs"))
            if text or logprobs:
                msg = self._open_message(out)
                msg.text.append(text or "")
                msg.logprobs.extend(logprobs)
                out.append(
                    self._emit(
                        OutputTextDelta,
                        item_id=msg.id,
                        output_index=msg.index,
                        content_index=0,
                        delta=text or "",
                        logprobs=logprobs,
                    )
                )
            for tool_delta in delta.get("tool_calls") or ():
                self._tool_delta(tool_delta, out)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return out

    def _final_items(
        self, status: ItemStatus, out: list[bytes], *, at_least_one: bool
    ) -> list[OutputItem]:
        if not self.items and at_least_one:
            self._open_message(out)
        for item in self.items:
            self._close(item, status, out)
        return [item.item(status) for item in self.items]

    def finish(self, completed_at: int) -> tuple[Response, list[bytes]]:
        """Close the open items; the final response (its event comes from :meth:`done`)."""
        out: list[bytes] = []
        status: ItemStatus = "incomplete" if self.finish_reason == "length" else "completed"
        resp = self.response
        resp.output = self._final_items(status, out, at_least_one=True)
        resp.usage = usage_from_chat(self.usage)
        finish(resp, self.finish_reason, completed_at)
        return resp, out

    def done(self) -> bytes:
        """``response.completed`` (or ``response.incomplete``) after :meth:`finish`."""
        cls = ResponseIncomplete if self.response.status == "incomplete" else ResponseCompleted
        return self._emit(cls, response=self.response)

    def failed(
        self, message: str, *, code: str | None = None, param: str | None = None
    ) -> tuple[Response, list[bytes]]:
        """The stream failed: the open items end ``incomplete``, then ``error``, then
        ``response.failed`` with what was generated."""
        out: list[bytes] = []
        resp = self.response
        resp.output = self._final_items("incomplete", out, at_least_one=False)
        out.append(self._emit(ErrorEvent, code=code, message=message, param=param))
        resp.usage = usage_from_chat(self.usage)
        resp.status = "failed"
        resp.error = ResponseError(code="server_error", message=message)
        out.append(self._emit(ResponseFailed, response=resp))
        return resp, out
