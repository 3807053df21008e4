from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.settings import EngineSettings, ServerSettings, Settings


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(model_name="fake-model", max_model_len=64)


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=str(tmp_path / "home"),
        engine=EngineSettings(kind="fake", max_model_len=64),
        server=ServerSettings(max_body_bytes=64 * 1024),
    )
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c
