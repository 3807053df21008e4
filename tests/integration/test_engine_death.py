"""Kill the engine process under a live gateway: clear errors, 503s, and a non-zero exit."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest

from tests.integration.conftest import start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration


def test_engine_death_fails_requests_and_exits_nonzero(model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path, model_dir, name="doomed")
    try:
        result: dict[str, object] = {}
        flowing = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream(
                    "POST",
                    srv.url + "/v1/completions",
                    json={
                        "model": srv.model,
                        "prompt": "Count slowly:",
                        "max_tokens": 1500,
                        "stream": True,
                        "temperature": 0,
                    },
                    timeout=60,
                ) as r:
                    result["status"] = r.status_code
                    parts = []
                    for part in r.iter_text():
                        parts.append(part)
                        flowing.set()
                    result["body"] = "".join(parts)
            except httpx.HTTPError as exc:  # a dropped connection is also a clear failure
                result["error"] = repr(exc)

        t = threading.Thread(target=stream)
        t.start()
        assert flowing.wait(60), f"the stream never started: {result}"
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "the engine core runs in a child process"
        for child in children:
            os.kill(child.pid, signal.SIGKILL)

        health_codes = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                health_codes.add(httpx.get(srv.url + "/health", timeout=2).status_code)
                health_codes.add(httpx.get(srv.url + "/ready", timeout=2).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        t.join(timeout=30)
        assert not t.is_alive(), "the in-flight stream must not hang"
        assert "error" in result or '"error"' in str(result.get("body")), result
        assert srv.proc.wait(timeout=60) != 0, "the gateway must exit non-zero"
        assert 503 in health_codes, health_codes
    finally:
        stop_server(srv)
