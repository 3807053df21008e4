"""The Responses event encoder: chat chunks in, OpenAI's event sequence out.

Every event is validated against the spec's ``ResponseStreamEvent``, and the whole stream
is fed to the official SDK's own accumulator (what ``client.responses.stream`` runs), which
raises on any out-of-order or inconsistent event.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from gateway.openai.responses_output import skeleton
from gateway.openai.responses_protocol import ResponsesRequest
from gateway.openai.responses_stream import EventEncoder, chat_sse_objects
from tests.openai_schema import assert_valid


def encoder(**fields: Any) -> EventEncoder:
    req = msgspec.convert({"model": "m", "input": "Hi", **fields}, ResponsesRequest)
    return EventEncoder(skeleton(req, "resp_test", 100, store=True))


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
    if finish is not None:
        choice["finish_reason"] = finish
    return {"object": "chat.completion.chunk", "choices": [choice]}


def tool_chunk(index: int, *, id_: str | None = None, name: str | None = None,
               args: str = "") -> dict[str, Any]:  # fmt: skip
    fn: dict[str, Any] = {"arguments": args}
    delta: dict[str, Any] = {"index": index, "function": fn}
    if id_ is not None:
        delta.update(id=id_, type="function")
        fn["name"] = name
    return {"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}


def run(enc: EventEncoder, chunks: list[dict[str, Any]], *, fail: str | None = None) -> list[Any]:
    """Encode a whole stream; returns the events as JSON objects (checked on the way)."""
    raw = enc.start()
    for c in chunks:
        raw += enc.chunk(c)
    if fail is not None:
        _, tail = enc.failed(fail, code="engine_dead")
        raw += tail
    else:
        _, tail = enc.finish(101)
        raw += [*tail, enc.done()]
    events = []
    for frame in raw:
        head, data = frame.decode().rstrip("\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        assert_valid("ResponseStreamEvent", event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def sdk_final(events: list[Any]) -> Any:
    """Feed the events to the SDK's ``ResponseStreamState``; the response it completes."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for e in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=e))
    return state._completed_response


def test_text_stream_sequence() -> None:
    events = run(encoder(), [text_chunk("Hel"), text_chunk("lo", "stop"), USAGE])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    assert [e["delta"] for e in events if e["type"].endswith("text.delta")] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello"
    item_id = events[2]["item"]["id"]
    assert all(e.get("item_id", item_id) == item_id for e in events[3:9])
    final = events[-1]["response"]
    assert_valid("Response", final)
    assert final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["output"][0]["id"] == item_id
    assert final["usage"]["output_tokens"] == 4
    sdk = sdk_final(events)
    assert sdk.output_text == "Hello"
    assert sdk.status == "completed"


def test_tool_call_stream() -> None:
    chunks = [
        text_chunk("Let me check."),
        tool_chunk(0, id_="call_a", name="get_weather", args='{"city": '),
        tool_chunk(0, args='"Paris"}'),
        tool_chunk(1, id_="call_b", name="get_time", args="{}"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        USAGE,
    ]
    events = run(encoder(tools=[{"type": "function", "name": "get_weather"},
                                {"type": "function", "name": "get_time"}]), chunks)  # fmt: skip
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    # The message closes when the first call starts; each call streams its arguments.
    i = types.index("response.output_text.done")
    assert types[i : i + 5] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
    ]
    args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"], e["output_index"]) for e in args_done] == [
        ("get_weather", '{"city": "Paris"}', 1),
        ("get_time", "{}", 2),
    ]
    final = events[-1]
    assert final["type"] == "response.completed"
    output = final["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert [o.get("call_id") for o in output[1:]] == ["call_a", "call_b"]
    sdk = sdk_final(events)
    calls = [o for o in sdk.output if o.type == "function_call"]
    assert [c.arguments for c in calls] == ['{"city": "Paris"}', "{}"]


def test_length_ends_incomplete() -> None:
    events = run(encoder(max_output_tokens=16), [text_chunk("abc", "length"), USAGE])
    last = events[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"


def test_empty_generation_still_has_a_message() -> None:
    events = run(encoder(), [text_chunk("", "stop"), USAGE])
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == ""
    assert sdk_final(events).output_text == ""


def test_failure_mid_stream() -> None:
    events = run(encoder(), [text_chunk("Hel")], fail="The engine died.")
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "The engine died."
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "The engine died."}
    assert failed["output"][0]["content"][0]["text"] == "Hel"
    assert failed["output"][0]["status"] == "incomplete"


def test_logprob_deltas() -> None:
    lp = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": None, "top_logprobs": []}]}
    chunk = text_chunk("Hi", "stop")
    chunk["choices"][0]["logprobs"] = lp
    events = run(encoder(include=["message.output_text.logprobs"]), [chunk, USAGE])
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                  "top_logprobs": []}]  # fmt: skip
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == delta["logprobs"]


@pytest.mark.parametrize("split", [1, 7, 1000])
async def test_chat_sse_objects_reframes_any_split(split: int) -> None:
    raw = b'data: {"a": 1}\n\ndata: {"b": [2]}\n\n: comment\n\ndata: [DONE]\n\ndata: {"c": 3}\n\n'

    async def pieces() -> Any:
        for i in range(0, len(raw), split):
            yield raw[i : i + split]

    assert [o async for o in chat_sse_objects(pieces())] == [{"a": 1}, {"b": [2]}]
