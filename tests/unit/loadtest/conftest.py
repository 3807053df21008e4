"""The real gateway app, fake engine, served by uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.settings import EngineSettings, ServerSettings, Settings
from retort.settings import ModelSettings

ADAPTER = "fake-adapter"


@pytest.fixture(scope="session")
def gateway_url() -> Iterator[str]:
    engine = FakeEngine(model_name="fake-model", max_model_len=2048)
    asyncio.run(engine.load_adapter(ADAPTER, "/unused"))
    settings = Settings(
        # The adapter lives on the fake engine itself, not in a registry: LoRA (the
        # registry-backed adapter manager) off, so that routing asks the engine.
        engine=EngineSettings(kind="fake", fake_token_delay_s=0.0, enable_lora=False),
        model=ModelSettings(served_name="fake-model"),
        server=ServerSettings(log_level="warning"),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, engine=engine), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
