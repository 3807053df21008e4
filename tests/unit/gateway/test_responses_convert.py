"""The Responses request as a chat-completions request, and chat bodies as Responses.

Tests of ``text.format``, ``tools`` and function-call items go through the chat request's
``response_format``, ``tools``, ``tool_choice`` and ``tool_calls`` fields (issue 10, parts 1
and 2): while the chat path lacks those fields they must be refused by name (400,
``unsupported_parameter``); once it has them, they must carry the translation.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.errors import BadRequestError
from gateway.openai.protocol import ChatCompletionRequest, ChatMessage
from gateway.openai.responses_convert import (
    REFUSED,
    chat_param_to_responses,
    chat_tool_choice,
    chat_tools,
    input_messages,
    output_messages,
    response_format_of,
    to_chat,
)
from gateway.openai.responses_output import response_from_chat, skeleton
from gateway.openai.responses_protocol import FunctionCall, OutputMessage, ResponsesRequest
from tests.openai_schema import assert_valid

CHAT_HAS_FORMAT = "response_format" in ChatCompletionRequest.__struct_fields__
CHAT_HAS_TOOLS = "tools" in ChatCompletionRequest.__struct_fields__
MESSAGES_HAVE_TOOL_CALLS = "tool_calls" in ChatMessage.__struct_fields__

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER["parameters"],
        "strict": True,
    },
}


def req(**fields: Any) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "Hi", **fields}, ResponsesRequest)


def plain(value: Any) -> Any:
    """A struct or dict as builtins without null fields (to compare with a request dict)."""
    value = msgspec.to_builtins(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def refused(exc: pytest.ExceptionInfo[BadRequestError], param: str) -> None:
    assert exc.value.status_code == 400
    assert exc.value.param == param
    assert exc.value.code == "unsupported_parameter"


# ---------------------------------------------------------------- input, instructions


def test_string_input_is_one_user_message() -> None:
    call = to_chat(req(input="Hello"))
    assert call.chat.chat_messages() == [{"role": "user", "content": "Hello"}]
    assert call.context == [{"role": "user", "content": "Hello"}]


def test_message_items_with_text_parts_and_instructions() -> None:
    call = to_chat(
        req(
            instructions="Be brief.",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "What is "},
                                             {"type": "input_text", "text": "2+2?"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "4", "annotations": []}]},
                {"role": "developer", "content": "Answer in words."},
                {"role": "user", "content": "And 3+3?"},
            ],
        )
    )  # fmt: skip
    assert call.chat.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "developer", "content": "Answer in words."},
        {"role": "user", "content": "And 3+3?"},
    ]
    # Instructions are not part of the context a later response continues.
    assert call.context[0] == {"role": "user", "content": "What is 2+2?"}
    assert len(call.context) == 4


def test_history_comes_before_the_input() -> None:
    history = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    call = to_chat(req(input="C", instructions="sys"), history)
    assert [m["content"] for m in call.chat.chat_messages()] == ["sys", "A", "B", "C"]
    assert [m["content"] for m in call.context] == ["A", "B", "C"]


def test_sampling_fields_map_to_chat() -> None:
    r = req(
        max_output_tokens=32,
        temperature=0.2,
        top_p=0.5,
        metadata={"team": "a"},
        user="u1",
        stream=True,
    )
    chat = to_chat(r).chat
    assert chat.max_completion_tokens == 32
    assert chat.temperature == 0.2
    assert chat.top_p == 0.5
    assert chat.metadata == {"team": "a"}
    assert chat.user == "u1"
    assert chat.stream is True
    assert chat.include_usage()  # the final usage chunk feeds ``response.completed``
    s = chat.to_sampling()
    assert (s.max_tokens, s.temperature, s.top_p, s.n) == (32, 0.2, 0.5, 1)


def test_logprobs_include() -> None:
    chat = to_chat(req(include=["message.output_text.logprobs"], top_logprobs=3)).chat
    assert chat.logprobs is True
    assert chat.top_logprobs == 3
    assert to_chat(req()).chat.logprobs is False


@pytest.mark.parametrize(
    ("items", "param", "code"),
    [
        ([], "input", "invalid_value"),
        ([{"role": "robot", "content": "x"}], "input[0].role", "invalid_value"),
        ([{"role": "user"}], "input[0].content", "invalid_value"),
        ([{"role": "user", "content": 3}], "input[0].content", "invalid_value"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}],
            "input[0].content[0].type",
            "unsupported_parameter",
        ),
        ([{"type": "item_reference", "id": "msg_1"}], "input[0].type", "unsupported_parameter"),
        ([{"type": "reasoning", "summary": []}], "input[0].type", "unsupported_parameter"),
    ],
)
def test_bad_input_items(items: list[dict[str, Any]], param: str, code: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        input_messages(items)
    assert exc.value.param == param
    assert exc.value.code == code


def test_missing_input_is_a_400() -> None:
    with pytest.raises(BadRequestError) as exc:
        to_chat(msgspec.convert({"model": "m"}, ResponsesRequest))
    assert exc.value.param == "input"


def test_max_output_tokens_below_16_is_refused_on_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="max_output_tokens"):
        req(max_output_tokens=5)


# ---------------------------------------------------------------- the refusal list


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"moderation": {"model": "omni"}}, "moderation"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["file_search_call.results"]}, "include[0]"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "file_search"}]}, "tools[1].type"),
    ],
)
def test_output_changing_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError) as exc:
        to_chat(req(**fields))
    refused(exc, param)
    assert param.split("[")[0] in REFUSED


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning": None},
        {"reasoning": {"effort": None, "summary": None}},
        {"truncation": "disabled"},
        {"background": False},
        {"text": {"verbosity": "medium"}},
        {"text": {"format": {"type": "text"}}},
        {"include": ["message.output_text.logprobs"]},
        {"tool_choice": "auto"},
        {"tool_choice": "none", "parallel_tool_calls": True},
        {"store": False, "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s"},
    ],
)
def test_defaults_and_output_neutral_fields_are_accepted(fields: dict[str, Any]) -> None:
    assert to_chat(req(**fields)).chat.model == "m"


# ---------------------------------------------------------------- text.format, tools


def test_text_format_mapping() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = req(text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                             "strict": True, "description": "A thing."}})  # fmt: skip
    assert response_format_of(r) == {
        "type": "json_schema",
        "json_schema": {
            "name": "thing",
            "schema": schema,
            "description": "A thing.",
            "strict": True,
        },
    }
    assert response_format_of(req(text={"format": {"type": "json_object"}})) == {
        "type": "json_object"
    }
    assert response_format_of(req(text={"format": {"type": "text"}})) is None
    with pytest.raises(BadRequestError) as exc:
        response_format_of(req(text={"format": {"type": "json_schema", "name": "x"}}))
    assert exc.value.param == "text.format.schema"


def test_text_format_reaches_the_chat_request() -> None:
    """Depends on the chat path's ``response_format`` (issue 10, part 1)."""
    r = req(text={"format": {"type": "json_object"}})
    if not CHAT_HAS_FORMAT:
        with pytest.raises(BadRequestError) as exc:
            to_chat(r)
        refused(exc, "text.format")
        return
    chat = to_chat(r).chat
    assert plain(chat.response_format) == {"type": "json_object"}  # type: ignore[attr-defined]


def test_tools_mapping() -> None:
    assert chat_tools([WEATHER]) == [CHAT_WEATHER]
    bare = chat_tools([{"type": "function", "name": "f"}])
    assert bare == [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(BadRequestError) as exc:
        chat_tools([{"type": "function"}])
    assert exc.value.param == "tools[0].name"


def test_tool_choice_mapping() -> None:
    tools = chat_tools([WEATHER, {"type": "function", "name": "other"}])
    assert chat_tool_choice("required", tools) == ("required", tools)
    named = {"type": "function", "name": "get_weather"}
    assert chat_tool_choice(named, tools) == (
        {"type": "function", "function": {"name": "get_weather"}},
        tools,
    )
    allowed = {"type": "allowed_tools", "mode": "required",
               "tools": [{"type": "function", "name": "other"}]}  # fmt: skip
    assert chat_tool_choice(allowed, tools) == ("required", tools[1:])
    with pytest.raises(BadRequestError) as exc:
        chat_tool_choice({**allowed, "tools": [{"type": "function", "name": "nope"}]}, tools)
    assert exc.value.param == "tool_choice.tools"
    with pytest.raises(BadRequestError) as exc:
        chat_tool_choice({"type": "web_search_preview"}, tools)
    refused(exc, "tool_choice.type")


def test_tools_reach_the_chat_request() -> None:
    """Depends on the chat path's ``tools``/``tool_choice`` (issue 10, part 2)."""
    r = req(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False)  # fmt: skip
    if not CHAT_HAS_TOOLS:
        with pytest.raises(BadRequestError) as exc:
            to_chat(r)
        assert exc.value.code == "unsupported_parameter"
        assert exc.value.param in ("tools", "tool_choice")
        return
    chat: Any = to_chat(r).chat
    assert plain(chat.tools) == [CHAT_WEATHER]
    assert plain(chat.tool_choice) == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.parallel_tool_calls is False


FUNCTION_ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
    {"type": "function_call", "call_id": "call_2", "name": "get_weather",
     "arguments": '{"city": "Lyon"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    {"type": "function_call_output", "call_id": "call_2",
     "output": [{"type": "input_text", "text": "21C"}]},
]  # fmt: skip
ROUND_TRIP_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
]  # fmt: skip


def test_function_call_items_become_tool_messages() -> None:
    """Depends on chat messages carrying ``tool_calls`` (issue 10, part 2)."""
    if not MESSAGES_HAVE_TOOL_CALLS:
        with pytest.raises(BadRequestError) as exc:
            input_messages(FUNCTION_ROUND_TRIP)
        refused(exc, "input[1]")
        return
    assert input_messages(FUNCTION_ROUND_TRIP) == ROUND_TRIP_MESSAGES
    chat: Any = to_chat(req(input=FUNCTION_ROUND_TRIP, tools=[WEATHER])).chat
    assert plain(chat.messages[1].tool_calls) == ROUND_TRIP_MESSAGES[1]["tool_calls"]
    assert chat.messages[2].tool_call_id == "call_1"


def test_output_becomes_the_next_turn() -> None:
    output = [
        OutputMessage(id="msg_1", status="completed", content=[]),
        FunctionCall(id="fc_1", call_id="call_1", name="f", arguments="{}", status="completed"),
    ]
    assert output_messages(output) == [
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
    ]  # fmt: skip


def test_chat_params_are_renamed_in_errors() -> None:
    assert chat_param_to_responses("response_format") == "text.format"
    assert chat_param_to_responses("response_format.json_schema.schema") == "text.format.schema"
    assert chat_param_to_responses("messages[3].content") == "input"
    assert chat_param_to_responses("max_completion_tokens") == "max_output_tokens"
    assert chat_param_to_responses("tools[0].function.parameters") == "tools[0].parameters"
    assert chat_param_to_responses("tool_choice.function.name") == "tool_choice.name"
    assert chat_param_to_responses("model") == "model"
    assert chat_param_to_responses(None) is None


# ---------------------------------------------------------------- chat body -> Response


def chat_body(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def test_response_from_chat_text() -> None:
    r = req(instructions="sys", metadata={"a": "b"}, max_output_tokens=64, tools=[WEATHER])
    resp = response_from_chat(
        chat_body({"role": "assistant", "content": "Paris."}),
        skeleton(r, "resp_1", 5, store=True),
        6,
    )
    body = msgspec.to_builtins(resp)
    assert_valid("Response", body)
    assert body["status"] == "completed"
    assert body["completed_at"] == 6
    (item,) = body["output"]
    assert item["type"] == "message"
    assert item["status"] == "completed"
    assert item["content"] == [
        {"type": "output_text", "text": "Paris.", "annotations": [], "logprobs": []}
    ]
    assert body["usage"]["input_tokens"] == 7
    assert body["usage"]["total_tokens"] == 10
    assert body["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert body["tools"] == [{**WEATHER}]
    assert (body["instructions"], body["metadata"], body["max_output_tokens"]) == (
        "sys",
        {"a": "b"},
        64,
    )


def test_response_from_chat_tool_calls_and_length() -> None:
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ],
    }  # fmt: skip
    body = msgspec.to_builtins(
        response_from_chat(
            chat_body(msg, "tool_calls"), skeleton(req(), "resp_2", 5, store=False), 6
        )
    )
    assert_valid("Response", body)
    (call,) = body["output"]
    assert call["type"] == "function_call"
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_9", "get_weather", '{"city": "Oslo"}'
    )  # fmt: skip
    assert call["id"].startswith("fc_")
    assert body["store"] is False

    cut = msgspec.to_builtins(
        response_from_chat(
            chat_body({"role": "assistant", "content": "Par"}, "length"),
            skeleton(req(), "resp_3", 5, store=True),
            6,
        )
    )
    assert_valid("Response", cut)
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["completed_at"] is None
    assert cut["output"][0]["status"] == "incomplete"


def test_response_from_chat_logprobs() -> None:
    choice_logprobs = {
        "content": [
            {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": None}]},
        ]
    }  # fmt: skip
    chat = chat_body({"role": "assistant", "content": "Hi"})
    chat["choices"][0]["logprobs"] = choice_logprobs
    r = req(include=["message.output_text.logprobs"], top_logprobs=1)
    body = msgspec.to_builtins(response_from_chat(chat, skeleton(r, "resp_4", 5, store=True), 6))
    assert_valid("Response", body)
    assert body["output"][0]["content"][0]["logprobs"] == [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]},
    ]  # fmt: skip
