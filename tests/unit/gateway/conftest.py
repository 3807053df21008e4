from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from litestar.testing.transport import TestClientTransport

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.settings import EngineSettings, ServerSettings, Settings


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, untrained) student exported to ONNX, built once for the students,
    shadow and rollout tests (read-only: they publish copies of it)."""
    pytest.importorskip("onnxruntime_genai")
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("student-build")
    base = make_tiny_base(root / "tiny", seed=3, hidden_size=64)
    return build_onnx(base, root / "onnx", "fp32")


@pytest.fixture(autouse=True)
def in_process_client_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Litestar's in-process client names its peer ``testclient``; it is this process, so
    it says ``127.0.0.1`` here (the admin guard knows no test-only host names)."""
    parse = TestClientTransport.parse_request

    def parse_request(self: TestClientTransport[Any], request: Any) -> dict[str, Any]:
        scope = parse(self, request)
        scope["client"] = ("127.0.0.1", 50000)
        return scope

    monkeypatch.setattr(TestClientTransport, "parse_request", parse_request)


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


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported tiny student (2 layers, hidden 64; exported in seconds)."""
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("student")
    base = make_tiny_base(root / "tiny-student", seed=3, hidden_size=64)
    return build_onnx(base, root / "onnx", "fp32")
