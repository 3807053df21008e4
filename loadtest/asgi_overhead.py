"""The gateway's own CPU per request, without HTTP (``python -m loadtest.asgi_overhead``).

Chat completions of 16 tokens on the fake engine (zero delay, prompt log off) are driven
straight through the Litestar app's ASGI callable in one process; the process CPU time per
request is taken over batches of 200 and the smallest batch reported (the one least
disturbed by other load on a shared machine). Run it from two checkouts to compare them:
``cd CHECKOUT && PYTHONPATH=$PWD python -m loadtest.asgi_overhead``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]

BATCH = 200


async def _measure(stream: bool, requests: int) -> dict[str, float]:
    from gateway.app import create_app
    from gateway.engines.fake import FakeEngine
    from gateway.promptlog.settings import PromptLogSettings
    from gateway.settings import EngineSettings, Settings

    settings = Settings(
        home=tempfile.mkdtemp(prefix="retort-asgi-overhead-"),
        engine=EngineSettings(kind="fake"),
        promptlog=PromptLogSettings(enabled=False),
    )
    app = create_app(settings, engine=FakeEngine("fake-model", 2048))
    body = json.dumps(
        {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "Hello there, how are you?"}],
            "max_tokens": 16,
            "stream": stream,
        }
    ).encode()
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]

    startup: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    ready = asyncio.Event()
    await startup.put({"type": "lifespan.startup"})

    async def lifespan_send(message: Any) -> None:
        ready.set()

    scope: Any = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    receive: Any = startup.get
    life = asyncio.ensure_future(app(scope, receive, lifespan_send))
    await ready.wait()

    async def one() -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        done = asyncio.Event()
        status = 0

        async def receive() -> Any:
            if pending:
                return pending.pop()
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body"):
                done.set()

        await app(scope, receive, send)  # type: ignore[arg-type]
        return status

    for _ in range(BATCH):  # warm-up
        assert await one() == 200
    per_req = []
    for _ in range(max(1, requests // BATCH)):
        c0 = time.process_time()
        for _ in range(BATCH):
            await one()
        per_req.append(1e6 * (time.process_time() - c0) / BATCH)
    await startup.put({"type": "lifespan.shutdown"})
    await life
    per_req.sort()
    return {"min_us": per_req[0], "median_us": per_req[len(per_req) // 2]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=4000, help="per mode")
    args = p.parse_args(argv)
    import uvloop

    out = {}
    for mode in ("non-stream", "stream"):
        out[mode] = uvloop.run(_measure(mode == "stream", args.requests))
        m = out[mode]
        print(f"{mode}: CPU µs/request min {m['min_us']:.0f}, median {m['median_us']:.0f}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
