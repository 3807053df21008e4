"""The real gateway app, fake engine, served by uvicorn in a thread on a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.settings import EngineSettings, ServerSettings, Settings
from loadtest.servers import serving_app
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
    with serving_app(create_app(settings, engine=engine), log_level="warning") as url:
        yield url
