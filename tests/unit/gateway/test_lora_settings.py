"""LoRA is on by default (what ``make serve`` runs); turned off, adapter calls get 503."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.engines.fake import FakeEngine
from gateway.engines.vllm import engine_args
from gateway.settings import AdaptersSettings, EngineSettings, Settings, load_settings


def test_defaults_serve_lora_with_room_for_every_loaded_adapter() -> None:
    s = load_settings(environ={})
    assert s.engine.enable_lora is True
    assert s.engine.max_cpu_loras is not None
    # vLLM must be able to hold every adapter the gateway keeps loaded.
    assert s.engine.max_cpu_loras >= s.adapters.max_loaded
    assert s.engine.max_loras <= s.engine.max_cpu_loras
    args = engine_args(s.engine, "/models/m", "m")
    assert args["enable_lora"] is True
    assert args["max_loras"] == s.engine.max_loras
    assert args["max_lora_rank"] == s.engine.max_lora_rank
    assert args["max_cpu_loras"] == s.engine.max_cpu_loras


def test_lora_off_leaves_vllm_lora_arguments_out() -> None:
    s = load_settings(environ={"RETORT_ENGINE__ENABLE_LORA": "false"})
    args = engine_args(s.engine, "/models/m", "m")
    assert args["enable_lora"] is False
    assert not {"max_loras", "max_lora_rank", "max_cpu_loras"} & set(args)


@pytest.fixture
def lora_off(tmp_path: Path) -> Iterator[TestClient[Any]]:
    settings = Settings(
        home=str(tmp_path),
        engine=EngineSettings(kind="fake", max_model_len=64, enable_lora=False),
        adapters=AdaptersSettings(dir=str(tmp_path / "adapters")),
    )
    with TestClient(create_app(settings, engine=FakeEngine("fake-model", 64))) as c:
        yield c


def test_adapter_calls_with_lora_off_are_503_lora_disabled(lora_off: TestClient[Any]) -> None:
    for r in (
        lora_off.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": "tiny"}),
        lora_off.post("/admin/adapters", json={"name": "tiny"}),
        lora_off.get("/admin/adapters"),
    ):
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "lora_disabled"
        assert "enable_lora" in err["message"]
