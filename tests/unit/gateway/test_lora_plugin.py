"""The vLLM plugin that installs the fast LoRA ops: where vLLM finds it, when it applies,
and that it leaves vLLM as shipped when vLLM's internals are not the expected ones."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
from vllm.platforms import current_platform

from gateway.engines import lora_plugin
from gateway.engines.lora_ops import FastPunicaWrapperCPU
from gateway.engines.vllm import engine_environ
from gateway.settings import EngineSettings, load_settings

ROOT = Path(__file__).resolve().parents[3]
ENTRY = "gateway.engines.lora_plugin:register"

pytestmark = pytest.mark.skipif(not current_platform.is_cpu(), reason="vLLM-CPU only")


@pytest.fixture
def platform_restored() -> Iterator[type[Any]]:
    """The CPU platform class, its get_punica_wrapper put back afterwards."""
    cls = type(current_platform)
    original = cls.__dict__["get_punica_wrapper"]
    try:
        yield cls
    finally:
        setattr(cls, "get_punica_wrapper", original)  # noqa: B010


def test_vllm_loads_it_from_the_general_plugins_group() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"] == {
        "retort_lora_fast_ops": ENTRY
    }
    installed = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert installed.get("retort_lora_fast_ops") == ENTRY, (
        "the installed retort-gateway has no vllm.general_plugins entry point: "
        "run `pip install -e .` again"
    )


def test_this_vllm_is_the_one_the_ops_were_written_for() -> None:
    assert lora_plugin.check_vllm(current_platform) == []


def test_register_makes_vllm_build_the_fast_wrapper(
    platform_restored: type[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.delenv(lora_plugin.ENV, raising=False)
    assert get_punica_wrapper(16, 4, device="cpu").__class__ is punica_cpu.PunicaWrapperCPU
    with caplog.at_level(logging.INFO, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.register()
    assert lora_plugin.APPLIED in caplog.text
    assert current_platform.get_punica_wrapper() == lora_plugin.QUALNAME
    assert isinstance(get_punica_wrapper(16, 4, device="cpu"), FastPunicaWrapperCPU)


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_turns_it_off(
    platform_restored: type[Any], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(lora_plugin.ENV, value)
    lora_plugin.register()
    assert current_platform.get_punica_wrapper() == punica_cpu.__name__ + ".PunicaWrapperCPU"


def test_other_vllm_internals_leave_vllm_unchanged(
    platform_restored: type[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A vLLM whose CPU wrapper changed shape (a renamed parameter, a method gone) or whose
    CPU platform picks another wrapper: a warning, and vLLM's own ops."""
    monkeypatch.delenv(lora_plugin.ENV, raising=False)
    shipped = punica_cpu.__name__ + ".PunicaWrapperCPU"

    def expand(self: Any, y: Any, x: Any, w: Any, add_input: bool) -> None:
        raise AssertionError("never called")

    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "_expand_decode", expand)
    monkeypatch.delattr(punica_cpu.PunicaWrapperCPU, "add_lora_logits")
    with caplog.at_level(logging.WARNING, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.register()
    assert "NOT applied" in caplog.text
    assert "_expand_decode" in caplog.text
    assert "add_lora_logits is missing" in caplog.text
    assert current_platform.get_punica_wrapper() == shipped
    monkeypatch.undo()

    monkeypatch.setattr(
        platform_restored, "get_punica_wrapper", classmethod(lambda cls: "some.Other")
    )
    assert lora_plugin.check_vllm(current_platform) == [
        f"the CPU platform uses 'some.Other', not {shipped!r}"
    ]


def test_the_setting_reaches_the_engine_processes_environment() -> None:
    assert load_settings(environ={}).engine.lora_fast_ops is True
    assert engine_environ(EngineSettings())[lora_plugin.ENV] == "1"
    off = load_settings(environ={"RETORT_ENGINE__LORA_FAST_OPS": "false"})
    assert engine_environ(off.engine)[lora_plugin.ENV] == "0"
    assert (
        engine_environ(EngineSettings(cpu_kv_cache_space_gb=3.4))["VLLM_CPU_KVCACHE_SPACE"] == "3"
    )
