"""Function tools and structured outputs for chat: what a request asks of the output, and how
the model's text becomes ``tool_calls``.

Just past ~400 lines on purpose: the parsers, the plan and the stream that applies the plan
chunk by chunk are one concept and read top to bottom.

A request's ``response_format``, ``tools``, ``tool_choice`` and ``parallel_tool_calls`` become
one :class:`OutputPlan`:

- ``tool_choice`` ``"required"`` or a named function: constrained decoding against the tools'
  parameter schemas (vLLM's structured outputs), so the arguments always parse and validate.
  ``required`` generates ``[{"name": ..., "parameters": {...}}, ...]``, as vLLM's own server
  does; a named function generates its arguments object.
- ``"auto"`` (the default with tools): the model writes free text in its tool-call format,
  which the configured parser (``model.tool_call_parser``) turns into ``tool_calls``.
- ``"none"`` or no tools: plain text, constrained by ``response_format`` when it asks for
  JSON.

:class:`ToolStream` does the same for a stream, choice by choice: a named call streams its
arguments as they are generated; ``required`` and parsed calls are sent once complete; plain
text in ``auto`` mode streams at once, holding back only what could be the start of a call.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from gateway.engines.base import OutputConstraint
from gateway.openai.protocol import (
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    ParamError,
    ToolCall,
)
from retort.chat_template import tool_spec

if TYPE_CHECKING:
    from gateway.openai.protocol import ChatCompletionRequest

__all__ = [
    "PARSERS",
    "OutputPlan",
    "Parsed",
    "ToolStream",
    "check_schema",
    "new_call_id",
    "plan_output",
]

Mode = Literal["text", "auto", "required", "named"]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A JSON Schema that is not one: 400 naming ``param``."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ParamError(f"Invalid JSON schema: {exc.message}", param=param) from None
    except Exception as exc:  # an unknown $schema dialect, a broken reference, ...
        raise ParamError(f"Invalid JSON schema: {exc}", param=param) from None


# ---------------------------------------------------------------- parsers (tool_choice auto)


@dataclass(frozen=True, slots=True)
class _Parser:
    """A text format for tool calls: each call is a JSON object ``{"name", "arguments"}``
    (or ``"parameters"``) between ``start`` and ``end``; ``end`` empty means the call runs
    to the end of the output."""

    start: str
    end: str
    at_start_only: bool = False
    """The call must open the output (Llama 3's JSON format); else it may follow text."""


PARSERS: dict[str, _Parser] = {
    # Hermes 2 Pro, Qwen 2.5, SmolLM2, many fine-tunes: <tool_call>{...}</tool_call>
    "hermes": _Parser("<tool_call>", "</tool_call>"),
    # Llama 3.x JSON tool calling: the whole output is {"name": ..., "parameters": {...}}
    "llama3_json": _Parser("{", "", at_start_only=True),
}
"""Tool-call parsers by name (``model.tool_call_parser``). vLLM's own parsers need the
format's markers to be single tokens of the vocabulary, which small models such as SmolLM2
lack, so these parse the text."""


@dataclass(slots=True)
class Parsed:
    """A finished choice: its text content and tool calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    valid: bool = True
    """False when a constrained output did not parse (it was cut by ``max_tokens``)."""


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or name not in names or not isinstance(args, dict):
        return None
    return ToolCall(
        id=new_call_id(),
        function=FunctionCall(name=name, arguments=msgspec.json.encode(args).decode()),
    )


def parse_calls(parser: _Parser, text: str, names: set[str]) -> Parsed:
    """Split a free-text answer into content and tool calls. Text that does not parse as a
    call of a known tool stays content, as in vLLM's parsers."""
    pos = text.find(parser.start)
    if pos < 0 or (parser.at_start_only and text[:pos].strip()):
        return Parsed(content=text)
    content = text[:pos].strip() or None
    calls: list[ToolCall] = []
    rest = text[pos:]
    if not parser.end:
        try:
            obj = msgspec.json.decode(rest.strip())
        except msgspec.DecodeError:
            return Parsed(content=text)
        objs = obj if isinstance(obj, list) else [obj]
        for o in objs:
            call = _call(o, names)
            if call is None:
                return Parsed(content=text)
            calls.append(call)
        return Parsed(content=content, tool_calls=calls)
    pattern = re.compile(re.escape(parser.start) + r"(.*?)" + re.escape(parser.end), re.S)
    for m in pattern.finditer(rest):
        try:
            call = _call(msgspec.json.decode(m.group(1).strip()), names)
        except msgspec.DecodeError:
            call = None
        if call is None:
            return Parsed(content=text)
        calls.append(call)
    if not calls:
        return Parsed(content=text)
    return Parsed(content=content, tool_calls=calls)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class OutputPlan:
    mode: Mode = "text"
    tools: list[dict[str, Any]] | None = None
    """The tools rendered into the prompt (None: none)."""
    constraint: OutputConstraint | None = None
    named: str | None = None
    parallel: bool = True
    parser: str | None = None
    json_kind: str | None = None
    """``json_schema`` / ``json_object`` when ``response_format`` asks for JSON."""

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or ()}

    def finish(self, text: str, finish_reason: str) -> tuple[Parsed, str]:
        """A finished choice's content, tool calls and OpenAI ``finish_reason``."""
        if self.mode == "named":
            assert self.named is not None
            call = ToolCall(
                id=new_call_id(), function=FunctionCall(name=self.named, arguments=text)
            )
            # OpenAI answers a forced function with finish_reason "stop".
            return Parsed(content=None, tool_calls=[call], valid=_is_json(text)), finish_reason
        if self.mode == "required":
            try:
                objs = msgspec.json.decode(text)
            except msgspec.DecodeError:
                return Parsed(content=text, valid=False), finish_reason
            calls = [c for o in objs if (c := _call(o, self.names)) is not None]
            if not calls:
                return Parsed(content=text, valid=False), finish_reason
            return Parsed(content=None, tool_calls=calls), "tool_calls"
        if self.mode == "auto":
            assert self.parser is not None
            parsed = parse_calls(PARSERS[self.parser], text, self.names)
            if parsed.tool_calls:
                if not self.parallel:
                    parsed.tool_calls = parsed.tool_calls[:1]
                return parsed, "tool_calls"
            return parsed, finish_reason
        return Parsed(content=text, valid=self.json_kind is None or _is_json(text)), finish_reason


def _is_json(text: str) -> bool:
    try:
        msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return True


def _required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t["function"]["name"]]},
                        "parameters": t["function"].get("parameters") or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                }
                for t in tools
            ]
        },
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


_TEXT_PLAN = OutputPlan()
"""Plain text, the common plan (immutable: one for every request)."""


def plan_output(req: ChatCompletionRequest, parser: str | None) -> OutputPlan:
    """Check ``response_format``, ``tools`` and ``tool_choice`` and decide how the output is
    produced. Raises :class:`ParamError` (HTTP 400) for what cannot be honoured."""
    constraint: OutputConstraint | None = None
    json_kind: str | None = None
    fmt = req.response_format
    if isinstance(fmt, JsonSchemaResponseFormat):
        schema = fmt.json_schema.schema
        if schema is not None:
            check_schema(schema, "response_format")
        constraint = OutputConstraint(json_schema=schema or {"type": "object"})
        json_kind = "json_schema"
    elif isinstance(fmt, JsonObjectFormat):
        constraint = OutputConstraint()
        json_kind = "json_object"

    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise ParamError(
                "tool_choice is only allowed when tools are specified", param="tool_choice"
            )
        if constraint is None:
            return _TEXT_PLAN
        return OutputPlan(constraint=constraint, json_kind=json_kind)

    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, t in enumerate(req.tools):
        f = t.function
        if f.name in seen:
            raise ParamError(f"duplicate function name {f.name!r}", param=f"tools[{i}]")
        seen.add(f.name)
        if f.parameters is not None:
            check_schema(f.parameters, f"tools[{i}].function.parameters")
        tools.append(tool_spec(msgspec.to_builtins(t)))
    parallel = req.parallel_tool_calls is not False

    if choice == "none":
        # As vLLM: the tools stay out of the prompt, so the model answers in text.
        return OutputPlan(constraint=constraint, json_kind=json_kind)
    if choice == "required":
        return OutputPlan(
            mode="required",
            tools=tools,
            constraint=OutputConstraint(
                json_schema=_required_schema(tools, parallel), param="tool_choice"
            ),
            parallel=parallel,
        )
    if choice is not None and not isinstance(choice, str):
        name = choice.function.name
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise ParamError(
                f"tool_choice names function {name!r}, which is not in tools",
                param="tool_choice",
            )
        return OutputPlan(
            mode="named",
            tools=tools,
            constraint=OutputConstraint(
                json_schema=tool["function"]["parameters"], param="tool_choice"
            ),
            named=name,
            parallel=parallel,
        )
    # "auto", the default with tools.
    if parser is None:
        raise ParamError(
            "tool_choice 'auto' needs a tool-call parser for this model "
            "(model.tool_call_parser); use tool_choice 'required' or a named function",
            param="tool_choice",
        )
    if constraint is not None:
        # A JSON answer format leaves no room for a call in free text; a forced call does.
        raise ParamError(
            "response_format JSON with tool_choice 'auto' is not supported: "
            "use tool_choice 'required' or a named function",
            param="response_format",
        )
    return OutputPlan(mode="auto", tools=tools, parallel=parallel, parser=parser)


# ---------------------------------------------------------------- streaming


@dataclass(slots=True)
class ToolStream:
    """One choice of a streamed answer under an :class:`OutputPlan`: text deltas in,
    (content, tool-call deltas) out; :meth:`finish` flushes what was held back."""

    plan: OutputPlan
    text: list[str] = field(default_factory=list)
    _sent: int = 0
    """Characters of the joined text already sent as content (auto mode)."""
    _buffering: bool = False
    _call_id: str | None = None

    def feed(self, delta: str) -> tuple[str | None, list[DeltaToolCall] | None]:
        """A text delta -> content to send now and tool-call deltas to send now."""
        self.text.append(delta)
        mode = self.plan.mode
        if mode == "named":
            if self._call_id is None:
                self._call_id = new_call_id()
                return None, [
                    DeltaToolCall(
                        index=0,
                        id=self._call_id,
                        type="function",
                        function=DeltaFunction(name=self.plan.named, arguments=delta),
                    )
                ]
            if not delta:
                return None, None
            return None, [DeltaToolCall(index=0, function=DeltaFunction(arguments=delta))]
        if mode == "required":
            return None, None
        if mode == "auto" and not self._buffering:
            assert self.plan.parser is not None
            marker = PARSERS[self.plan.parser].start
            full = "".join(self.text)
            pos = full.find(marker, self._sent)
            if pos >= 0 and (not PARSERS[self.plan.parser].at_start_only or not full[:pos].strip()):
                self._buffering = True
                out = full[self._sent : pos]
                self._sent = pos
                return out or None, None
            if (
                PARSERS[self.plan.parser].at_start_only
                and full.strip()
                and not full.lstrip().startswith(marker)
            ):
                # Not a call: plain text from here on.
                self.plan = OutputPlan()
            hold = _held_back(full, marker) if self.plan.mode == "auto" else 0
            out = full[self._sent : len(full) - hold]
            self._sent = len(full) - hold
            return out or None, None
        if mode == "auto":
            return None, None
        return delta or None, None

    def finish(self, finish_reason: str) -> tuple[str | None, list[DeltaToolCall], str, bool]:
        """(content still to send, tool-call deltas, finish_reason, output valid)."""
        full = "".join(self.text)
        mode = self.plan.mode
        if mode == "named":
            if self._call_id is None:
                self._call_id = new_call_id()
                call = DeltaToolCall(
                    index=0,
                    id=self._call_id,
                    type="function",
                    function=DeltaFunction(name=self.plan.named, arguments=""),
                )
                return None, [call], finish_reason, _is_json(full)
            return None, [], finish_reason, _is_json(full)
        parsed, reason = self.plan.finish(full, finish_reason)
        if mode == "text":
            return None, [], reason, parsed.valid
        deltas = [
            DeltaToolCall(
                index=j,
                id=c.id,
                type="function",
                function=DeltaFunction(name=c.function.name, arguments=c.function.arguments),
            )
            for j, c in enumerate(parsed.tool_calls)
        ]
        if deltas:
            rest = None
            if mode == "auto" and parsed.content is not None:
                # Content before the first call that was held back, if any.
                rest = parsed.content[self._sent :] if len(parsed.content) > self._sent else None
            return rest or None, deltas, reason, parsed.valid
        return full[self._sent :] or None, [], reason, parsed.valid


def _held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
