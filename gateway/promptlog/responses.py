"""Stored responses (the Responses API's ``store: true``), in the prompt log's database.

A stored response is written before its create call returns (or, streamed, before
``response.completed`` is sent), so that ``GET /v1/responses/{id}`` and
``previous_response_id`` find it at once on any replica sharing the database. Stored
responses are redacted like the log (``promptlog.redact``) and purged with it
(``promptlog.retention_days``). A response is visible only to the API key that made it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
import sqlalchemy as sa

from retort.db.schema import responses

if TYPE_CHECKING:
    from gateway.promptlog.redact import Redactor
    from retort.db.store import PromptStore

__all__ = ["ResponseStore", "StoredResponse"]


class StoredResponse(msgspec.Struct, kw_only=True):
    id: str
    request_id: str
    model: str
    status: str
    context: list[dict[str, Any]]
    """The chat messages the response answered (history and input, no instructions)."""
    response: dict[str, Any]
    """The ``Response`` object as returned to the client (JSON)."""
    key_id: str | None = None
    previous_response_id: str | None = None
    created: float = msgspec.field(default_factory=time.time)


def _redact_arguments(redactor: Redactor, arguments: str) -> str:
    """Redact the string values of a JSON arguments object (keeping it valid JSON)."""
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return redactor.redact(arguments)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            return redactor.redact(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return msgspec.json.encode(walk(value)).decode()


def redact_stored(redactor: Redactor, rec: StoredResponse) -> StoredResponse:
    """A copy of ``rec`` with message contents, output text, call arguments, tool outputs
    and instructions redacted."""
    context = []
    for m in redactor.redact_messages(rec.context):
        calls = m.get("tool_calls")
        if calls:
            m = {
                **m,
                "tool_calls": [
                    {
                        **c,
                        "function": {
                            **c["function"],
                            "arguments": _redact_arguments(redactor, c["function"]["arguments"]),
                        },
                    }
                    for c in calls
                ],
            }
        context.append(m)
    response = dict(rec.response)
    if isinstance(response.get("instructions"), str):
        response["instructions"] = redactor.redact(response["instructions"])
    output = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            item = {
                **item,
                "content": [
                    {**c, "text": redactor.redact(c["text"])}
                    if isinstance(c.get("text"), str)
                    else c
                    for c in item.get("content") or ()
                ],
            }
        elif item.get("type") == "function_call" and isinstance(item.get("arguments"), str):
            item = {**item, "arguments": _redact_arguments(redactor, item["arguments"])}
        output.append(item)
    response["output"] = output
    return msgspec.structs.replace(rec, context=context, response=response)


class ResponseStore:
    """Stored responses over the prompt log's :class:`PromptStore` (same engine)."""

    def __init__(self, store: PromptStore, redactor: Redactor | None = None) -> None:
        self.store = store
        self.redactor = redactor

    async def save(self, rec: StoredResponse) -> None:
        if self.redactor is not None:
            rec = redact_stored(self.redactor, rec)
        row = msgspec.structs.asdict(rec)
        async with self.store.engine.begin() as conn:
            await conn.execute(responses.insert().values(**row))

    async def get(self, response_id: str, key_id: str | None) -> StoredResponse | None:
        """The response, if it exists and belongs to ``key_id`` (``None``: auth off)."""
        async with self.store.engine.connect() as conn:
            row = (
                (await conn.execute(sa.select(responses).where(responses.c.id == response_id)))
                .mappings()
                .first()
            )
        if row is None or row["key_id"] != key_id:
            return None
        return StoredResponse(**dict(row))

    async def delete(self, response_id: str, key_id: str | None) -> bool:
        """Delete the response; ``False`` when it does not exist (for this key)."""
        cond = responses.c.id == response_id
        cond &= responses.c.key_id.is_(None) if key_id is None else responses.c.key_id == key_id
        async with self.store.engine.begin() as conn:
            result = await conn.execute(responses.delete().where(cond))
        return bool(result.rowcount)
