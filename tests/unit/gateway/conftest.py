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
def client(engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(
        engine=EngineSettings(kind="fake", max_model_len=64),
        server=ServerSettings(max_body_bytes=64 * 1024),
    )
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported tiny student (2 layers, hidden 64; exported in seconds)."""
    from adapters.testing import make_tiny_base
    from distill.export import build_onnx

    root = tmp_path_factory.mktemp("student")
    base = make_tiny_base(root / "tiny-student", seed=3, hidden_size=64)
    return build_onnx(base, root / "onnx", "fp32")
