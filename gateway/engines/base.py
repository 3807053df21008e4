"""The Engine protocol: the only thing routes know about a model runtime.

vLLM (base + LoRA adapters) and onnxruntime-genai (students) implement it; routes never
import vllm or onnxruntime. ``generate`` yields :class:`Chunk` deltas, one per engine step
and choice, and the final chunk of each choice carries its ``finish_reason``.

What only some engines can do is a separate capability, checked by type: LoRA adapters
(``isinstance(engine, AdapterEngine)``: vLLM and the fake engine, not students).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from retort.chat_template import render_tools

T = TypeVar("T")

__all__ = [
    "AdapterEngine",
    "BoundedEngine",
    "Chunk",
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineNotReadyError",
    "EngineOverloadedError",
    "GenerateRequest",
    "InvalidInputError",
    "OutputConstraint",
    "PromptTooLongError",
    "Sampling",
    "ServedModel",
    "TokenLogprob",
    "plain_sampling",
    "refuse_unsupported",
    "render_chat",
]


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """Constrained decoding: the output is JSON matching ``json_schema``, or any JSON object
    when the schema is ``None`` (``response_format`` and forced tool calls)."""

    json_schema: Mapping[str, Any] | None = None
    param: str = "response_format"
    """The request field it came from, named by the 400 when the engine rejects it."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Engine-level sampling parameters, already validated by the protocol layer."""

    n: int = 1
    max_tokens: int | None = None
    """Completion budget; ``None`` means up to the context length."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """``None``: no logprobs; ``k``: the sampled token's logprob plus the top ``k``."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` (speed measurements; as vLLM's ``ignore_eos``)."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> bias added to its logit (OpenAI's ``logit_bias``)."""
    constraint: OutputConstraint | None = None
    """Grammar-constrained output; an engine that cannot honour it raises
    :class:`InvalidInputError` rather than ignore it."""
    min_tokens: int = 0
    """No end token before this many tokens (vLLM's ``min_tokens``)."""


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    prompt: str | list[int] | None = None
    """Raw completion prompt (text or token ids). Exactly one of prompt/messages is set."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages, rendered with the model's own chat template by the engine. Besides
    ``role``/``content``, assistant messages may carry ``tool_calls`` (arguments as dicts)
    and tool messages ``tool_call_id``, as transformers' templates expect."""
    tools: list[dict[str, Any]] | None = None
    """Function tools (OpenAI's ``{"type": "function", "function": {...}}``), rendered into the
    prompt by the chat template's ``tools`` argument."""
    sampling: Sampling = field(default_factory=Sampling)
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(slots=True)
class Chunk:
    """A delta for one choice. Token counts are cumulative for the whole request."""

    index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far for this choice."""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class EngineError(Exception):
    """The engine failed while serving a request (HTTP 500)."""


class EngineDeadError(EngineError):
    """The engine process died; the gateway cannot serve anymore."""


class EngineNotReadyError(Exception):
    """The engine is starting or draining (HTTP 503)."""


class EngineOverloadedError(Exception):
    """The engine's queue is full (HTTP 503 with ``Retry-After: retry_after``)."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidInputError(ValueError):
    """The engine rejects the request's input or parameters (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(ValueError):
    """The prompt (plus the requested budget) does not fit the context (HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


def plain_sampling(sampling: Sampling) -> bool:
    """Whether a student can honour this request the way its teacher would: what a traffic
    split or a shadow copy may send it. Students honour every sampling field but
    ``logit_bias``, whose token ids belong to the teacher's tokenizer."""
    return not sampling.logit_bias


def render_chat(
    request: GenerateRequest,
    takes_tools: bool,
    apply: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], T],
) -> T:
    """A chat request through the model's template (``apply(messages, tools)``): tools as
    the template takes them, else as a Hermes system prompt (:func:`render_tools`); the
    template's own checks (jinja ``raise_exception``) become a 400 naming ``messages``."""
    assert request.messages is not None
    messages, tools = render_tools(request.messages, request.tools, takes_tools)
    try:
        return apply(messages, tools)
    except Exception as exc:
        raise InvalidInputError(
            f"the model's chat template rejected the messages: {exc}", param="messages"
        ) from exc


def refuse_unsupported(request: GenerateRequest, who: str) -> None:
    """For engines without constrained decoding, logit bias or tools: a 400 naming the
    field, never an answer that silently ignores it."""
    s = request.sampling
    if s.constraint is not None:
        raise InvalidInputError(
            f"{who}: constrained output ({s.constraint.param}) is not supported",
            param=s.constraint.param,
        )
    if s.logit_bias:
        raise InvalidInputError(f"{who}: logit_bias is not supported", param="logit_bias")
    if request.tools:
        raise InvalidInputError(f"{who}: tools are not supported", param="tools")


@runtime_checkable
class Engine(Protocol):
    """What every model runtime offers the gateway."""

    @property
    def model_name(self) -> str:
        """The base model's served name."""
        ...

    @property
    def max_model_len(self) -> int: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Stream chunks. Closing the iterator early aborts the request in the engine."""
        ...

    def ready(self) -> bool:
        """True once the engine can serve and while it is healthy."""
        ...

    def dead(self) -> bool:
        """True once the engine has failed for good (the process should exit)."""
        ...

    async def close(self) -> None: ...


class ServedModel:
    """:class:`Engine`'s ``model_name`` and ``max_model_len``, read from the ``_name`` and
    ``_max_len`` an engine sets: a base class the engines share."""

    _name: str
    _max_len: int

    @property
    def model_name(self) -> str:
        return self._name

    @property
    def max_model_len(self) -> int:
        return self._max_len


@runtime_checkable
class AdapterEngine(Engine, Protocol):
    """The LoRA capability: an engine that loads adapters on top of its base model."""

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]:
        """Names of the adapters loaded now."""
        ...


@runtime_checkable
class BoundedEngine(Protocol):
    """The capacity capability: how many sequences the engine runs at once (vLLM's
    ``max_num_seqs``); the gateway admits no more (:mod:`gateway.admission`)."""

    @property
    def max_num_seqs(self) -> int | None:
        """``None``: no bound."""
        ...
