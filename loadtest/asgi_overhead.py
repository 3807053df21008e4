"""The gateway's own CPU per request, without HTTP (``python -m loadtest.asgi_overhead``).

Chat completions of 16 tokens on the fake engine (zero delay, prompt log off) are driven
straight through the Litestar app's ASGI callable in one process; the process CPU time per
request is taken over batches of 200 and the smallest batch reported (the one least
disturbed by other load on a shared machine). Run it from two checkouts to compare them:
``cd CHECKOUT && PYTHONPATH=$PWD python -m loadtest.asgi_overhead``. ``--endpoint completions``
drives ``/v1/completions`` instead; ``--profile FILE`` writes a cProfile of the measured
requests only (not the start-up), for ``python -m pstats FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]

BATCH = 200


async def _measure(
    stream: bool, requests: int, endpoint: str = "chat", profile: cProfile.Profile | None = None
) -> dict[str, float]:
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
    payload: dict[str, Any] = {"model": "fake-model", "max_tokens": 16, "stream": stream}
    if endpoint == "chat":
        path = "/v1/chat/completions"
        payload["messages"] = [{"role": "user", "content": "Hello there, how are you?"}]
    else:
        path = "/v1/completions"
        payload["prompt"] = "Hello there, how are you?"
    body = json.dumps(payload).encode()
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
            "scheme": "http", "path": path, "raw_path": path.encode(),
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
    if profile is not None:
        profile.enable()
    for _ in range(max(1, requests // BATCH)):
        c0 = time.process_time()
        for _ in range(BATCH):
            await one()
        per_req.append(1e6 * (time.process_time() - c0) / BATCH)
    if profile is not None:
        profile.disable()
    await startup.put({"type": "lifespan.shutdown"})
    await life
    per_req.sort()
    return {"min_us": per_req[0], "median_us": per_req[len(per_req) // 2]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=4000, help="per mode")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--mode", choices=("both", "non-stream", "stream"), default="both")
    p.add_argument("--profile", help="write a cProfile of the measured requests to FILE.MODE")
    args = p.parse_args(argv)
    import uvloop

    out = {}
    modes = ("non-stream", "stream") if args.mode == "both" else (args.mode,)
    for mode in modes:
        prof = cProfile.Profile() if args.profile else None
        out[mode] = uvloop.run(_measure(mode == "stream", args.requests, args.endpoint, prof))
        m = out[mode]
        print(f"{mode}: CPU µs/request min {m['min_us']:.0f}, median {m['median_us']:.0f}")
        if prof is not None:
            prof.dump_stats(f"{args.profile}.{mode}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
