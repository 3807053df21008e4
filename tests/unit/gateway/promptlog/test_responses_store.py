"""Stored responses on both backends: save, get, delete, key scoping, redaction, retention."""

from __future__ import annotations

import json
import time

import pytest

from gateway.promptlog.redact import Redactor
from gateway.promptlog.responses import ResponseStore, StoredResponse, redact_stored
from retort.db.store import PromptStore

pytestmark = pytest.mark.asyncio(loop_scope="session")


def stored(i: int = 0, **fields: object) -> StoredResponse:
    base: dict[str, object] = {
        "id": f"resp_{i}",
        "request_id": f"req-{i}",
        "model": "base-model",
        "status": "completed",
        "context": [{"role": "user", "content": f"Question {i}?"}],
        "response": {
            "id": f"resp_{i}",
            "object": "response",
            "status": "completed",
            "instructions": None,
            "output": [
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": f"Answer {i}.", "annotations": [],
                              "logprobs": []}]},
            ],
        },
    }  # fmt: skip
    base.update(fields)
    return StoredResponse(**base)  # type: ignore[arg-type]


async def test_save_get_delete(store: PromptStore) -> None:
    responses = ResponseStore(store)
    rec = stored(1, key_id="team-a", previous_response_id="resp_0")
    await responses.save(rec)
    got = await responses.get("resp_1", "team-a")
    assert got == rec
    assert await responses.get("resp_1", "team-b") is None
    assert await responses.get("resp_1", None) is None
    assert await responses.get("resp_404", "team-a") is None
    assert not await responses.delete("resp_1", "team-b")
    assert not await responses.delete("resp_1", None)
    assert await responses.delete("resp_1", "team-a")
    assert await responses.get("resp_1", "team-a") is None
    assert not await responses.delete("resp_1", "team-a")


async def test_without_keys(store: PromptStore) -> None:
    responses = ResponseStore(store)
    await responses.save(stored(2))
    assert (await responses.get("resp_2", None)) is not None
    assert await responses.delete("resp_2", None)


async def test_nul_characters_survive_both_backends(store: PromptStore) -> None:
    responses = ResponseStore(store)
    await responses.save(stored(3, context=[{"role": "user", "content": "a\x00b"}]))
    got = await responses.get("resp_3", None)
    assert got is not None
    assert got.context == [{"role": "user", "content": "a\ufffdb"}]


async def test_redaction_on_save(store: PromptStore) -> None:
    responses = ResponseStore(store, Redactor())
    rec = stored(4)
    rec.context.append(
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "mail", "arguments": '{"to": "ada@example.com"}'}}]}
    )  # fmt: skip
    rec.response["instructions"] = "Reply to bob@example.org"
    rec.response["output"][0]["content"][0]["text"] = "Call 555-123-4567."
    rec.response["output"].append(
        {"type": "function_call", "id": "fc_1", "call_id": "call_2", "name": "call",
         "arguments": '{"phone": 5551234567, "who": "ada@example.com"}', "status": "completed"}
    )  # fmt: skip
    await responses.save(rec)
    got = await responses.get("resp_4", None)
    assert got is not None
    args = got.context[1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(args) == {"to": "[REDACTED:EMAIL]"}
    assert got.response["instructions"] == "Reply to [REDACTED:EMAIL]"
    assert got.response["output"][0]["content"][0]["text"] == "Call [REDACTED:PHONE]."
    # String values are redacted; the arguments stay valid JSON.
    assert json.loads(got.response["output"][1]["arguments"]) == {
        "phone": 5551234567,
        "who": "[REDACTED:EMAIL]",
    }


async def test_redact_stored_keeps_unparseable_arguments_as_text() -> None:
    rec = stored(5)
    rec.response["output"] = [
        {"type": "function_call", "id": "fc", "call_id": "c", "name": "f",
         "arguments": '{"to": "ada@example.com"', "status": "completed"}
    ]  # fmt: skip
    out = redact_stored(Redactor(), rec)
    assert out.response["output"][0]["arguments"] == '{"to": "[REDACTED:EMAIL]"'
    assert rec.response["output"][0]["arguments"] == '{"to": "ada@example.com"'  # a copy


async def test_retention_purges_old_responses(store: PromptStore) -> None:
    responses = ResponseStore(store)
    now = time.time()
    await responses.save(stored(6, created=now - 10 * 86400))
    await responses.save(stored(7, created=now))
    await store.purge_older_than(7, now=now)
    assert await responses.get("resp_6", None) is None
    assert await responses.get("resp_7", None) is not None
