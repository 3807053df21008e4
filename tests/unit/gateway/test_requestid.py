"""``gateway.requestid``: ids made here are uuid4 hex; headers read from the ASGI scope."""

from __future__ import annotations

import uuid
from typing import Any

from gateway.requestid import header, new_request_id, request_id


def test_new_request_ids_are_version_4_uuids_in_hex() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        u = uuid.UUID(hex=rid)
        assert (u.hex, u.version, u.variant) == (rid, 4, uuid.RFC_4122)
    # Every other bit is random: each hex digit outside the fixed ones takes many values.
    for pos in (0, 11, 13, 17, 31):
        assert len({rid[pos] for rid in ids}) > 8, pos


def _scope(*headers: tuple[bytes, bytes]) -> Any:
    return {"type": "http", "headers": list(headers), "state": {}}


def test_header_reads_the_first_value_as_latin_1() -> None:
    scope = _scope((b"x-a", b"caf\xe9"), (b"x-a", b"second"), (b"x-b", b"2"))
    assert header(scope, "x-a") == "café"
    assert header(scope, b"x-b") == "2"
    assert header(scope, "x-c") is None


def test_request_id_reuses_a_sane_client_id_else_makes_one() -> None:
    scope = _scope((b"x-request-id", b" req-1 "))
    assert request_id(scope) == "req-1"
    assert "request_id_generated" not in scope["state"]
    for bad in (b"has space", b"x" * 129, b""):
        scope = _scope((b"x-request-id", bad))
        rid = request_id(scope)
        assert uuid.UUID(hex=rid).version == 4
        assert scope["state"]["request_id_generated"] is True
        assert request_id(scope) == rid  # one id per request
