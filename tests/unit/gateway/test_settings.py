from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import load_settings
from retort.settings import SettingsError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETORT_HOME", raising=False)
    s = load_settings(environ={})
    assert s.server.port == 8000
    assert s.model.path == "default"
    assert s.engine.kind == "vllm"
    assert s.home_path == Path("~/.cache/retort").expanduser()


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "retort.yaml"
    cfg.write_text(
        "server:\n  port: 9000\nengine:\n  max_model_len: 4096\n  extra: {swap_space: 1}\n"
    )
    env = {
        "RETORT_ENGINE__MAX_MODEL_LEN": "1024",
        "RETORT_HOME": "/srv/retort",
        "RETORT_UNRELATED__THING": "x",
        "OTHER": "1",
    }
    s = load_settings(cfg, environ=env, overrides={"server": {"host": "0.0.0.0"}})
    assert s.server.port == 9000
    assert s.server.host == "0.0.0.0"
    assert s.engine.max_model_len == 1024
    assert s.engine.extra == {"swap_space": 1}
    assert s.home_path == Path("/srv/retort")


def test_env_values_are_yaml_typed() -> None:
    s = load_settings(environ={"RETORT_ENGINE__ENABLE_LORA": "true", "RETORT_SERVER__PORT": "81"})
    assert s.engine.enable_lora is True
    assert s.server.port == 81


@pytest.mark.parametrize(
    "text",
    ["server: {port: eighty}", "engine: {kind: tpu}", "sever: {port: 1}", "- a list", "a: [b"],
)
def test_invalid_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SettingsError):
        load_settings(cfg, environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})
