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


def test_ids_made_in_batches_are_never_handed_out_twice_across_threads() -> None:
    import threading

    got: list[list[str]] = [[] for _ in range(4)]

    def take(out: list[str]) -> None:
        out.extend(new_request_id() for _ in range(3000))

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [rid for out in got for rid in out]
    assert len(set(ids)) == len(ids) == 12000


def test_a_forked_child_makes_its_own_ids() -> None:
    import os

    new_request_id()  # the parent holds a batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, to the parent
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert uuid.UUID(hex=child).version == 4
    assert child != new_request_id()  # the parent's next id was not the child's
