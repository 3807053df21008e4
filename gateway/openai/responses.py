"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``: OpenAI's Responses API.

A response is served by the chat-completions handler itself: the request is translated
into a :class:`ChatCompletionRequest` (:mod:`gateway.openai.responses_convert`), so
routing, auth, limits, metrics (``endpoint="responses"``), the prompt log, adapters and
students apply unchanged; the chat body or stream that comes back is translated into a
``Response`` or its events (:mod:`gateway.openai.responses_stream`).

With ``store`` (the default, as in OpenAI), the response is written to the prompt-log
database before the call returns (streamed: before ``response.completed``), so that
``previous_response_id`` and ``GET`` find it on any replica right away.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from litestar import Request, Response, delete, get, post

from gateway.errors import (
    BadRequestError,
    NotFoundError,
    ServiceUnavailableError,
    to_api_error,
)
from gateway.openai.chat import chat_completions
from gateway.openai.protocol import encode
from gateway.openai.responses_convert import (
    LOGPROBS_INCLUDE,
    chat_param_to_responses,
    output_messages,
    to_chat,
)
from gateway.openai.responses_output import new_id, response_from_chat, skeleton
from gateway.openai.responses_protocol import DeletedResponse, ResponsesRequest
from gateway.openai.responses_protocol import Response as ResponseObject
from gateway.openai.responses_stream import EventEncoder, chat_sse_objects
from gateway.openai.serving import ENDPOINT_STATE, KEY_STATE, SSEStream
from gateway.openai.sse import iterate_events
from gateway.promptlog.responses import StoredResponse
from gateway.requestid import request_id
from gateway.state import Gateway

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.auth.keys import KeyInfo
    from gateway.promptlog.responses import ResponseStore

__all__ = ["RESPONSE_HANDLERS", "create_response", "delete_response", "get_response"]

log = logging.getLogger("retort.responses")

_JSON = "application/json"


def _key_id(request: Request[Any, Any, Any]) -> str | None:
    key: KeyInfo | None = request.scope.get("state", {}).get(KEY_STATE)
    return key.id if key is not None else None


def _store(gw: Gateway) -> ResponseStore | None:
    plog = gw.promptlog
    return plog.responses if plog is not None else None


def _require_store(gw: Gateway, param: str) -> ResponseStore:
    """The response store, for a parameter that cannot work without it: 400 when the
    prompt log is disabled, 503 while its database is not open yet."""
    store = _store(gw)
    if store is not None:
        return store
    if not gw.settings.promptlog.enabled:
        raise BadRequestError(
            f"`{param}` needs stored responses, which live in the prompt log, and the "
            "prompt log is disabled (promptlog.enabled: false).",
            param=param,
            code="unsupported_parameter",
        )
    raise _unavailable()


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The response store (the prompt-log database) is not available yet.",
        code="store_unavailable",
    )


def _readable_store(gw: Gateway) -> ResponseStore | None:
    """For GET and DELETE: ``None`` (so 404) when nothing can be stored; 503 while the
    database is not open yet."""
    store = _store(gw)
    if store is None and gw.settings.promptlog.enabled:
        raise _unavailable()
    return store


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")


async def _save(store: ResponseStore, rec: StoredResponse) -> None:
    """Store a finished response; a failure is logged (the client still gets its answer)."""
    try:
        with anyio.CancelScope(shield=True):
            await store.save(rec)
    except Exception:
        log.exception("responses: storing %s failed", rec.id)


@post("/responses", status_code=200, summary="Create a model response")
async def create_response(
    data: ResponsesRequest, gateway: Gateway, request: Request[Any, Any, Any]
) -> Response[bytes] | SSEStream:
    """OpenAI ``createResponse``, served by the chat-completions path."""
    key_id = _key_id(request)
    store = _require_store(gateway, "store") if data.store else _store(gateway)
    history: list[dict[str, Any]] = []
    prev_id = data.previous_response_id
    if prev_id is not None:
        prev = await _require_store(gateway, "previous_response_id").get(prev_id, key_id)
        if prev is None:
            raise BadRequestError(
                f"Previous response with id '{prev_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        prior = msgspec.convert(prev.response, ResponseObject)
        history = [*prev.context, *output_messages(prior.output)]
    call = to_chat(data, history)
    stored = data.store is not False and store is not None

    state = request.scope.setdefault("state", {})
    state[ENDPOINT_STATE] = "responses"
    rid = request_id(request.scope)
    resp_id = f"resp_{rid}" if state.get("request_id_generated") else new_id("resp")
    resp = skeleton(data, resp_id, int(time.time()), store=stored)
    try:
        result = await chat_completions.fn(data=call.chat, gateway=gateway, scope=request.scope)
    except Exception as exc:
        # The chat path names its own fields (`response_format`, `messages`, ...).
        err = to_api_error(exc)
        err.param = chat_param_to_responses(err.param)
        if err is exc:
            raise
        raise err from exc

    def record(final: ResponseObject) -> StoredResponse:
        return StoredResponse(
            id=resp_id,
            request_id=rid,
            model=data.model,
            status=final.status,
            context=call.context,
            response=msgspec.to_builtins(final),
            key_id=key_id,
            previous_response_id=prev_id,
        )

    if isinstance(result, SSEStream):
        events = _events(
            EventEncoder(resp), iterate_events(result), store if stored else None, record
        )
        return SSEStream(events)

    body = msgspec.json.decode(result.content)
    final = response_from_chat(body, resp, int(time.time()))
    if stored and store is not None:
        await _save(store, record(final))
    return Response(encode(final), media_type=_JSON, headers=dict(result.headers))


async def _events(
    enc: EventEncoder,
    chat: Any,
    store: ResponseStore | None,
    record: Any,
) -> AsyncIterator[bytes]:
    """The chat stream as Responses events; the response is stored before its last event."""
    try:
        for ev in enc.start():
            yield ev
        async for obj in chat_sse_objects(chat):
            err = obj.get("error")
            if isinstance(err, dict):
                final, tail = enc.failed(
                    str(err.get("message") or "The generation failed."),
                    code=err.get("code"),
                    param=chat_param_to_responses(err.get("param")),
                )
                if store is not None:
                    await _save(store, record(final))
                for ev in tail:
                    yield ev
                return
            for ev in enc.chunk(obj):
                yield ev
        final, tail = enc.finish(int(time.time()))
        for ev in tail:
            yield ev
        if store is not None:
            await _save(store, record(final))
        yield enc.done()
    finally:
        aclose = getattr(chat, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


def _check_get_query(request: Request[Any, Any, Any]) -> None:
    """``stream`` (replaying a background response's events) and ``include`` values other
    than logprobs (kept in the stored body when asked for at creation) are refused."""
    query = request.query_params
    if query.get("stream", "false").lower() not in ("false", "0", ""):
        raise BadRequestError(
            "Unsupported parameter: 'stream': stored responses are returned whole.",
            param="stream",
            code="unsupported_parameter",
        )
    for value in query.getall("include", []) + query.getall("include[]", []):
        if value != LOGPROBS_INCLUDE:
            raise BadRequestError(
                f"Unsupported parameter: 'include': only `{LOGPROBS_INCLUDE}` can be included.",
                param="include",
                code="unsupported_parameter",
            )


@get("/responses/{response_id:str}", summary="Get a model response")
async def get_response(
    response_id: str, gateway: Gateway, request: Request[Any, Any, Any]
) -> Response[bytes]:
    _check_get_query(request)
    store = _readable_store(gateway)
    found = await store.get(response_id, _key_id(request)) if store is not None else None
    if found is None:
        raise _not_found(response_id)
    return Response(encode(found.response), media_type=_JSON)


@delete(
    "/responses/{response_id:str}",
    status_code=200,
    summary="Delete a model response",
)
async def delete_response(
    response_id: str, gateway: Gateway, request: Request[Any, Any, Any]
) -> Response[bytes]:
    store = _readable_store(gateway)
    if store is None or not await store.delete(response_id, _key_id(request)):
        raise _not_found(response_id)
    return Response(encode(DeletedResponse(id=response_id)), media_type=_JSON)


RESPONSE_HANDLERS = [create_response, get_response, delete_response]
