"""Structured outputs and function tools: the plan, the parsers and the stream encoder."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.engines.chat_template import render_tools
from gateway.openai.protocol import REFUSED_FIELDS, ChatCompletionRequest, ParamError
from gateway.openai.tools import PARSERS, OutputPlan, ToolStream, parse_calls, plan_output

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def req(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return msgspec.convert(body, ChatCompletionRequest)


# ---------------------------------------------------------------- the plan


def test_no_tools_no_format_is_plain_text() -> None:
    plan = plan_output(req(), "hermes")
    assert plan.mode == "text"
    assert plan.constraint is None
    assert plan.tools is None


def test_json_schema_format_constrains_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    plan = plan_output(
        req(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        ),
        None,
    )
    assert plan.constraint is not None
    assert plan.constraint.json_schema == schema
    assert plan.constraint.param == "response_format"
    assert plan.json_kind == "json_schema"


def test_json_object_format_is_any_object() -> None:
    plan = plan_output(req(response_format={"type": "json_object"}), None)
    assert plan.constraint is not None
    assert plan.constraint.json_schema is None
    assert plan.json_kind == "json_object"


def test_text_format_is_unconstrained() -> None:
    assert plan_output(req(response_format={"type": "text"}), None).constraint is None


def test_invalid_schema_is_refused_naming_response_format() -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}
    with pytest.raises(ParamError) as e:
        plan_output(req(response_format=bad), None)
    assert e.value.param == "response_format"


def test_unknown_response_format_type_fails_decoding() -> None:
    with pytest.raises(msgspec.ValidationError, match="response_format"):
        req(response_format={"type": "yaml"})


def test_tool_choice_without_tools_is_refused() -> None:
    with pytest.raises(ParamError) as e:
        plan_output(req(tool_choice="required"), "hermes")
    assert e.value.param == "tool_choice"


def test_unknown_named_function_is_refused() -> None:
    choice = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(ParamError, match="nope") as e:
        plan_output(req(tools=[WEATHER], tool_choice=choice), "hermes")
    assert e.value.param == "tool_choice"


def test_malformed_tools_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        req(tools=[{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(msgspec.ValidationError):
        req(tools=[{"type": "web_search"}])
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
    with pytest.raises(ParamError) as e:
        plan_output(req(tools=[bad_params]), "hermes")
    assert e.value.param == "tools[0].function.parameters"
    with pytest.raises(ParamError, match="duplicate"):
        plan_output(req(tools=[WEATHER, WEATHER]), "hermes")


def test_named_choice_constrains_to_the_parameters() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_output(req(tools=[WEATHER, TIME], tool_choice=choice), "hermes")
    assert plan.mode == "named"
    assert plan.constraint is not None
    assert plan.constraint.json_schema == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert plan.constraint.param == "tool_choice"
    assert plan.tools is not None
    assert len(plan.tools) == 2


def test_required_builds_an_array_of_calls() -> None:
    plan = plan_output(req(tools=[WEATHER, TIME], tool_choice="required"), "hermes")
    assert plan.mode == "required"
    assert plan.constraint is not None
    schema = dict(plan.constraint.json_schema or {})
    assert schema["type"] == "array"
    assert schema["minItems"] == 1
    assert "maxItems" not in schema
    names = [alt["properties"]["name"]["enum"] for alt in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    single = plan_output(
        req(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False), "hermes"
    )
    assert single.constraint is not None
    assert dict(single.constraint.json_schema or {})["maxItems"] == 1


def test_none_keeps_tools_out_of_the_prompt() -> None:
    plan = plan_output(req(tools=[WEATHER], tool_choice="none"), "hermes")
    assert plan.mode == "text"
    assert plan.tools is None


def test_auto_needs_a_parser() -> None:
    assert plan_output(req(tools=[WEATHER]), "hermes").mode == "auto"
    with pytest.raises(ParamError) as e:
        plan_output(req(tools=[WEATHER]), None)
    assert e.value.param == "tool_choice"


# ---------------------------------------------------------------- finishing a choice


def test_required_output_becomes_tool_calls() -> None:
    plan = plan_output(req(tools=[WEATHER, TIME], tool_choice="required"), "hermes")
    text = json.dumps(
        [
            {"name": "get_weather", "parameters": {"city": "Paris"}},
            {"name": "get_time", "parameters": {}},
        ]
    )
    parsed, finish = plan.finish(text, "stop")
    assert finish == "tool_calls"
    assert parsed.content is None
    assert [c.function.name for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_required_output_cut_short_is_content_and_invalid() -> None:
    plan = plan_output(req(tools=[WEATHER], tool_choice="required"), "hermes")
    parsed, finish = plan.finish('[{"name": "get_wea', "length")
    assert finish == "length"
    assert not parsed.valid
    assert parsed.content == '[{"name": "get_wea'


def test_named_output_is_the_arguments() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_output(req(tools=[WEATHER], tool_choice=choice), "hermes")
    parsed, finish = plan.finish('{"city": "Oslo"}', "stop")
    assert finish == "stop"  # OpenAI's finish_reason for a forced function
    assert parsed.tool_calls[0].function.name == "get_weather"
    assert parsed.tool_calls[0].function.arguments == '{"city": "Oslo"}'


def test_hermes_parser() -> None:
    names = {"get_weather", "get_time"}
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
        '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    parsed = parse_calls(PARSERS["hermes"], text, names)
    assert parsed.content == "Let me check."
    assert [c.function.name for c in parsed.tool_calls] == ["get_weather", "get_time"]
    # Unknown functions and broken JSON stay text.
    for bad in (
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        "<tool_call>{not json}</tool_call>",
        "plain answer",
    ):
        p = parse_calls(PARSERS["hermes"], bad, names)
        assert p.tool_calls == []
        assert p.content == bad


def test_llama3_json_parser() -> None:
    names = {"get_time"}
    p = parse_calls(PARSERS["llama3_json"], '{"name": "get_time", "parameters": {}}', names)
    assert [c.function.name for c in p.tool_calls] == ["get_time"]
    text = 'The answer is {"name": "get_time"}'
    assert parse_calls(PARSERS["llama3_json"], text, names).content == text


def test_auto_without_parallel_keeps_the_first_call() -> None:
    plan = plan_output(req(tools=[WEATHER, TIME], parallel_tool_calls=False), "hermes")
    text = (
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
    )
    parsed, finish = plan.finish(text, "stop")
    assert finish == "tool_calls"
    assert [c.function.name for c in parsed.tool_calls] == ["get_time"]


def test_json_format_reports_invalid_output() -> None:
    plan = plan_output(req(response_format={"type": "json_object"}), None)
    assert plan.finish('{"a": 1}', "stop")[0].valid
    assert not plan.finish('{"a": ', "length")[0].valid


# ---------------------------------------------------------------- streaming


def _run(plan: OutputPlan, pieces: list[str], finish: str = "stop") -> dict[str, Any]:
    ts = ToolStream(plan)
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}

    def take(text: str | None, deltas: Any) -> None:
        if text:
            content.append(text)
        for d in deltas or ():
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                c["id"] = d.id
            if d.function is not None:
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""

    for piece in pieces:
        take(*ts.feed(piece))
    rest, deltas, reason, valid = ts.finish(finish)
    take(rest, deltas)
    return {"content": "".join(content), "calls": calls, "finish": reason, "valid": valid}


def test_stream_named_call_streams_its_arguments() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_output(req(tools=[WEATHER], tool_choice=choice), "hermes")
    ts = ToolStream(plan)
    _, first = ts.feed('{"ci')
    assert first is not None
    assert first[0].id is not None
    assert first[0].function is not None
    assert first[0].function.name == "get_weather"
    _, second = ts.feed('ty": "X"}')
    assert second is not None
    assert second[0].id is None
    out = _run(plan, ['{"ci', 'ty": ', '"X"}'])
    assert json.loads(out["calls"][0]["arguments"]) == {"city": "X"}
    assert out["finish"] == "stop"
    assert out["content"] == ""


def test_stream_required_sends_whole_calls_at_the_end() -> None:
    plan = plan_output(req(tools=[WEATHER], tool_choice="required"), "hermes")
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Lima"}}])
    out = _run(plan, [text[:7], text[7:20], text[20:]])
    assert out["finish"] == "tool_calls"
    assert out["calls"][0]["name"] == "get_weather"
    assert json.loads(out["calls"][0]["arguments"]) == {"city": "Lima"}


def test_stream_auto_plain_text_streams_at_once() -> None:
    plan = plan_output(req(tools=[WEATHER]), "hermes")
    ts = ToolStream(plan)
    assert ts.feed("Hello ")[0] == "Hello "
    # "<tool" could open a call: held back until it cannot.
    assert ts.feed("there <tool")[0] == "there "
    assert ts.feed("bar")[0] == "<toolbar"
    out = _run(plan, ["Hi ", "<tool", "box> ok"])
    assert out["content"] == "Hi <toolbox> ok"
    assert out["calls"] == {}
    assert out["finish"] == "stop"


def test_stream_auto_call_after_text() -> None:
    plan = plan_output(req(tools=[WEATHER]), "hermes")
    pieces = [
        "Sure. ",
        "<tool_",
        'call>{"name": "get_weather", ',
        '"arguments": {"city": "B"}}',
        "</tool_call>",
    ]
    out = _run(plan, pieces)
    assert out["content"] == "Sure. "
    assert out["finish"] == "tool_calls"
    assert json.loads(out["calls"][0]["arguments"]) == {"city": "B"}


def test_stream_auto_broken_call_is_sent_as_text() -> None:
    plan = plan_output(req(tools=[WEATHER]), "hermes")
    out = _run(plan, ["<tool_call>{oops", "</tool_call>"])
    assert out["content"] == "<tool_call>{oops</tool_call>"
    assert out["calls"] == {}


# ---------------------------------------------------------------- messages and refusals


def test_round_trip_messages_render_for_templates_without_tools() -> None:
    r = req(
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        tools=[WEATHER],
    )
    msgs = r.chat_messages()
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2]["tool_call_id"] == "call_1"
    plan = plan_output(r, "hermes")
    out, tools = render_tools(msgs, plan.tools, template_takes_tools=False)
    assert tools is None
    assert out[0]["role"] == "system"
    assert "get_weather" in out[0]["content"]
    assert "<tool_call>" in out[2]["content"]
    assert "Paris" in out[2]["content"]
    assert out[3] == {"role": "tool", "content": "<tool_response>\n18C\n</tool_response>"}
    # Templates that know tools get them as they are.
    same, tools2 = render_tools(msgs, plan.tools, template_takes_tools=True)
    assert same is msgs
    assert tools2 == plan.tools


def test_bad_round_trip_messages_are_refused() -> None:
    with pytest.raises(ParamError) as e:
        req(messages=[{"role": "tool", "content": "x"}]).chat_messages()
    assert e.value.param == "messages[0].tool_call_id"
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}
    with pytest.raises(ParamError) as e:
        req(messages=[{"role": "assistant", "tool_calls": [call]}]).chat_messages()
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def test_non_text_content_is_refused_not_dropped() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = req(messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}])
    with pytest.raises(ParamError) as e:
        r.chat_messages()
    assert e.value.param == "messages[0].content[1].type"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("web_search_options", {}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
    ],
)
def test_refused_fields_are_named(field: str, value: Any) -> None:
    assert field in REFUSED_FIELDS["chat"]
    assert req(**{field: value}).refused() == field


def test_harmless_fields_are_not_refused() -> None:
    r = req(modalities=["text"], store=True, service_tier="auto", prediction={"type": "content"})
    assert r.refused() is None


def test_logit_bias_keys_are_token_ids() -> None:
    assert req(logit_bias={"42": 5, "7": -100}).token_bias() == {42: 5.0, 7: -100.0}
    with pytest.raises(ParamError):
        req(logit_bias={"hello": 1}).token_bias()
    with pytest.raises(msgspec.ValidationError):
        req(logit_bias={"1": 101})
