"""Kill the engine process under 8 live streams: each ends with a clear error and a log
record that says so, new requests get 503, ``/health`` turns 503, and the gateway exits
non-zero within a bound."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest

from retort.db.store import PromptStore
from tests.integration.conftest import start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration

STREAMS = 8
EXIT_BOUND_S = 30.0
"""The watchdog notices within 0.5 s; the drain and the log flush take the rest."""


def _rows(home: Path) -> list[dict[str, Any]]:
    async def query() -> list[dict[str, Any]]:
        async with PromptStore(f"sqlite+aiosqlite:///{home}/retort.db") as store:
            return await store.query()

    return asyncio.run(query())


def test_engine_death_fails_streams_logs_them_and_exits_nonzero(
    model_dir: Path, tmp_path: Path
) -> None:
    srv = start_server(tmp_path, model_dir, name="doomed")
    try:
        results: list[dict[str, Any]] = [{} for _ in range(STREAMS)]
        flowing = [threading.Event() for _ in range(STREAMS)]

        def stream(i: int) -> None:
            out = results[i]
            body = {
                "model": srv.model,
                "prompt": f"Count slowly from {i}:",
                "max_tokens": 1500,
                "stream": True,
                "temperature": 0,
            }
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
                    out["status"] = r.status_code
                    out["request_id"] = r.headers.get("x-request-id")
                    events = []
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: ") :])
                            flowing[i].set()
                    out["events"] = events
            except httpx.HTTPError as exc:
                out["error"] = repr(exc)
            finally:
                flowing[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for e in flowing:
            assert e.wait(180), "every stream must be flowing before the kill"
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "the engine core runs in a child process"
        killed_at = time.monotonic()
        for child in children:
            os.kill(child.pid, signal.SIGKILL)

        codes: set[int] = set()
        new_request: httpx.Response | None = None
        while time.monotonic() - killed_at < EXIT_BOUND_S and srv.proc.poll() is None:
            try:
                codes.add(httpx.get(srv.url + "/health", timeout=2).status_code)
                if new_request is None and 503 in codes:
                    new_request = httpx.post(
                        srv.url + "/v1/completions",
                        json={"model": srv.model, "prompt": "hi", "max_tokens": 2},
                        timeout=5,
                    )
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "an in-flight stream must not hang"
        code = srv.proc.wait(timeout=60)
        took = time.monotonic() - killed_at
        assert code != 0, "the gateway must exit non-zero"
        assert took < EXIT_BOUND_S + 5, f"exit took {took:.1f} s"
        assert 503 in codes, codes
        if new_request is not None:  # it may have exited first
            assert new_request.status_code == 503, new_request.text
            assert new_request.json()["error"]["code"] in ("engine_dead", "engine_not_ready")

        ids = []
        for out in results:
            assert out.get("status") == 200, out  # all were flowing: the error is an event
            last, done = out["events"][-2:]
            assert done == "[DONE]", out
            error = json.loads(last)["error"]
            assert error["code"] == "engine_dead", error
            assert "engine" in error["message"], error
            ids.append(out["request_id"])

        # Every stream's record was flushed before the exit, and says how it ended.
        print(f"\nengine death: {STREAMS} streams, exit {code} after {took:.1f} s")  # the figure
        by_id = {r["request_id"]: r for r in _rows(srv.home)}
        for rid in ids:
            row = by_id.get(rid)
            assert row is not None, f"no log record for {rid}: {sorted(by_id)}"
            assert row["status"] == "error", row
            assert "engine died" in row["error"], row
    finally:
        stop_server(srv)
