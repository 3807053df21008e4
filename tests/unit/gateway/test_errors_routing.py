from __future__ import annotations

import msgspec
import pytest

from gateway.engines.base import EngineDeadError, EngineError, InvalidInputError
from gateway.engines.fake import FakeEngine
from gateway.errors import ModelNotFoundError, to_api_error
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, PromptError
from gateway.openai.serving import DONE, sse, sse_error
from gateway.routing import Router


def test_msgspec_errors_name_the_param() -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.json.decode(
            b'{"model": "m", "messages": [{"role": 3}]}', type=ChatCompletionRequest
        )
    err = to_api_error(exc.value)
    assert err.status_code == 400
    assert err.param == "messages[0].role"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ModelNotFoundError("x"), 404, "model_not_found"),
        (InvalidInputError("bad ids", param="prompt"), 400, None),
        (PromptError("batch"), 400, None),
        (EngineDeadError("gone"), 503, "engine_dead"),
        (EngineError("oom"), 500, "engine_error"),
        (RuntimeError("secret internals"), 500, "internal_error"),
    ],
)
def test_mapping(exc: Exception, status: int, code: str | None) -> None:
    err = to_api_error(exc)
    assert err.status_code == status
    assert err.code == code
    if isinstance(exc, RuntimeError):
        assert "secret" not in err.message


def test_sse_framing() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    framed = sse_error(EngineError("boom"))
    assert framed.startswith(b'data: {"error":{')
    assert framed.endswith(b"\n\n")


async def test_routing() -> None:
    eng = FakeEngine(model_name="base")
    router = Router(eng, aliases=("/models/base",))
    assert (await router.resolve("base")).adapter is None
    assert (await router.resolve("/models/base")).engine is eng
    with pytest.raises(ModelNotFoundError):
        await router.resolve("sql-lora")
    await eng.load_adapter("sql-lora", "/adapters/sql")
    assert (await router.resolve("sql-lora")).adapter == "sql-lora"
    assert [m[:2] for m in router.model_ids()] == [("base", None), ("sql-lora", "base")]


def test_sampling_conversion() -> None:
    req = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'"max_tokens":5,"max_completion_tokens":7,"stop":"x","logprobs":true,"top_logprobs":3}',
        type=ChatCompletionRequest,
    )
    s = req.to_sampling()
    assert s.max_tokens == 7
    assert list(s.stop) == ["x"]
    assert s.logprobs == 3
    assert req.chat_messages() == [{"role": "user", "content": "hi"}]
    comp = msgspec.json.decode(b'{"model":"m","prompt":"p"}', type=CompletionRequest)
    assert comp.to_sampling().max_tokens == 16
    assert comp.to_sampling().temperature == 1.0
