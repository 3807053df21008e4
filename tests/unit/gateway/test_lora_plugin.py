"""The vLLM plugin that installs the fast LoRA ops: where vLLM finds it, when it applies,
and that it leaves vLLM as shipped when vLLM's internals are not the expected ones."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")

from vllm.config import CompilationMode
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
from vllm.platforms import current_platform

from gateway.engines import lora_plugin
from gateway.engines.lora_ops import FastPunicaWrapperCPU
from gateway.engines.vllm import aot_environ, engine_environ
from gateway.settings import EngineSettings, load_settings

ROOT = Path(__file__).resolve().parents[3]
ENTRY = "gateway.engines.lora_plugin:register"

pytestmark = pytest.mark.skipif(not current_platform.is_cpu(), reason="vLLM-CPU only")


@pytest.fixture
def platform_restored() -> Iterator[type[Any]]:
    """The CPU platform class, its get_punica_wrapper and check_and_update_config put back
    afterwards."""
    cls = type(current_platform)
    saved = {n: cls.__dict__[n] for n in ("get_punica_wrapper", "check_and_update_config")}
    try:
        yield cls
    finally:
        for name, value in saved.items():
            setattr(cls, name, value)


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
    off = load_settings(
        environ={"RETORT_ENGINE__LORA_FAST_OPS": "false", "RETORT_ENGINE__LORA_COMPILE": "false"}
    )
    assert engine_environ(off.engine)[lora_plugin.ENV] == "0"
    assert engine_environ(off.engine)[lora_plugin.COMPILE_ENV] == "0"
    assert (
        engine_environ(EngineSettings(cpu_kv_cache_space_gb=3.4))["VLLM_CPU_KVCACHE_SPACE"] == "3"
    )


def test_lora_compile_is_on_by_default_and_needs_the_fast_ops() -> None:
    assert load_settings(environ={}).engine.lora_compile is True
    assert engine_environ(EngineSettings())[lora_plugin.COMPILE_ENV] == "1"
    with pytest.raises(ValueError, match=r"lora_compile needs engine\.lora_fast_ops"):
        EngineSettings(lora_fast_ops=False)
    assert EngineSettings(lora_fast_ops=False, lora_compile=False).lora_compile is False


class _Config:
    """The parts of a VllmConfig the compile switch reads, after vLLM's __post_init__ set
    the mode (VLLM_COMPILE unless enforce_eager) and before the platform's hook."""

    def __init__(self, mode: Any, lora: Any) -> None:
        self.compilation_config = SimpleNamespace(mode=mode)
        self.lora_config = lora


def _hooked(cls: type[Any], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace what the CPU platform's hook does with the two lines the switch undoes (the
    real hook needs a whole VllmConfig); returns the configs it saw."""
    seen: list[Any] = []

    def hook(klass: type[Any], vllm_config: Any) -> None:
        seen.append(vllm_config)
        cc = vllm_config.compilation_config
        if cc.mode == CompilationMode.VLLM_COMPILE:
            cc.mode = CompilationMode.DYNAMO_TRACE_ONCE
        if vllm_config.lora_config is not None:
            cc.mode = CompilationMode.NONE

    monkeypatch.setattr(cls, "check_and_update_config", classmethod(hook))
    assert lora_plugin.check_compile(cls) != []  # the stand-in's source is not vLLM's
    monkeypatch.setattr(lora_plugin, "check_compile", lambda c: [])
    return seen


def ids_fully_sharded(lora: Any) -> bool:
    return bool(getattr(lora, "fully_sharded_loras", False))


def test_the_switch_fits_this_vllm() -> None:
    assert lora_plugin.check_compile(type(current_platform)) == []


@pytest.mark.parametrize(
    ("before", "lora", "after"),
    [
        ("VLLM_COMPILE", SimpleNamespace(fully_sharded_loras=False), "DYNAMO_TRACE_ONCE"),
        ("VLLM_COMPILE", None, "DYNAMO_TRACE_ONCE"),  # no LoRA: vLLM's own choice
        ("NONE", SimpleNamespace(fully_sharded_loras=False), "NONE"),  # enforce_eager
        ("VLLM_COMPILE", SimpleNamespace(fully_sharded_loras=True), "NONE"),
    ],
    ids=["lora", "no-lora", "enforce-eager", "fully-sharded"],
)
def test_register_keeps_the_compile_mode_with_lora(
    platform_restored: type[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
    before: str,
    lora: Any,
    after: str,
) -> None:
    seen = _hooked(platform_restored, monkeypatch)
    monkeypatch.delenv(lora_plugin.ENV, raising=False)
    monkeypatch.setenv(lora_plugin.COMPILE_ENV, "1")
    with caplog.at_level(logging.INFO, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.register()
        lora_plugin.register()  # a second load changes nothing
        config = _Config(getattr(CompilationMode, before), lora)
        current_platform.check_and_update_config(config)
    assert "fast ops: NOT applied" not in caplog.text
    assert ("fully sharded LoRA is not supported" in caplog.text) is (ids_fully_sharded(lora))
    assert seen == [config]
    assert config.compilation_config.mode == getattr(CompilationMode, after)
    applied = lora_plugin.COMPILE_APPLIED + "DYNAMO_TRACE_ONCE"
    assert (applied in caplog.text) is (lora is not None and after == "DYNAMO_TRACE_ONCE")


@pytest.mark.parametrize("fast_ops", ["1", "0"])
def test_without_the_setting_or_the_fast_ops_lora_stays_eager(
    platform_restored: type[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any, fast_ops: str
) -> None:
    _hooked(platform_restored, monkeypatch)
    monkeypatch.setenv(lora_plugin.ENV, fast_ops)
    monkeypatch.setenv(lora_plugin.COMPILE_ENV, "0" if fast_ops == "1" else "1")
    with caplog.at_level(logging.INFO, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.register()
        config = _Config(CompilationMode.VLLM_COMPILE, SimpleNamespace(fully_sharded_loras=False))
        current_platform.check_and_update_config(config)
    assert config.compilation_config.mode == CompilationMode.NONE
    assert lora_plugin.COMPILE_APPLIED not in caplog.text
    if fast_ops == "0":
        assert "NOT applied, it needs the LoRA fast ops" in caplog.text


def test_another_platform_hook_leaves_it_eager(
    platform_restored: type[Any], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A vLLM whose CPU hook no longer has the expected lines: a warning, vLLM's mode."""

    def hook(klass: type[Any], vllm_config: Any) -> None:
        vllm_config.compilation_config.mode = CompilationMode.NONE

    monkeypatch.setattr(platform_restored, "check_and_update_config", classmethod(hook))
    monkeypatch.delenv(lora_plugin.ENV, raising=False)
    monkeypatch.setenv(lora_plugin.COMPILE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.register()
    assert "retort LoRA compile: NOT applied" in caplog.text
    assert "no longer picks DYNAMO_TRACE_ONCE" in caplog.text
    assert platform_restored.__dict__["check_and_update_config"].__func__ is hook
    config = _Config(CompilationMode.VLLM_COMPILE, SimpleNamespace(fully_sharded_loras=False))
    current_platform.check_and_update_config(config)
    assert config.compilation_config.mode == CompilationMode.NONE


# --- loading vLLM-CPU's AOT compile artifact (engine.aot_cache) ----------------------------


def test_the_aot_fix_fits_this_vllm() -> None:
    assert lora_plugin.check_aot_load() == []


def test_aot_cache_is_on_by_default_and_reaches_the_engine_processes() -> None:
    assert load_settings(environ={}).engine.aot_cache is True
    assert engine_environ(EngineSettings())[lora_plugin.AOT_ENV] == "1"
    off = load_settings(environ={"RETORT_ENGINE__AOT_CACHE": "false"}).engine
    assert engine_environ(off)[lora_plugin.AOT_ENV] == "0"
    # Where vLLM-CPU compiles, AOT compile stays vLLM's default (on) with the fix, and is
    # turned off without it (inductor's caches only); no compile, nothing to switch.
    assert aot_environ(EngineSettings(), on_cpu=True) == {}
    assert aot_environ(off, on_cpu=True) == {"VLLM_USE_AOT_COMPILE": "0"}
    eager = EngineSettings(lora_compile=False)
    assert aot_environ(eager, on_cpu=True) == {}
    assert aot_environ(EngineSettings(aot_cache=False), on_cpu=False) == {}


def _artifact(compiled: Any) -> Any:
    return SimpleNamespace(_artifacts=SimpleNamespace(compiled_fn=compiled))


def test_a_loaded_function_without_finalize_loading_gets_a_no_op_one(
    monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """vLLM's loader calls ``loaded._artifacts.compiled_fn.finalize_loading(config)``: for
    inductor's plain function (the DYNAMO_TRACE_ONCE path) the wrapped torch loader adds a
    no-op one, and leaves vLLM's own kind (which has one) alone."""
    import torch.compiler

    def inductor_fn(*args: Any) -> Any:
        return args

    class VllmKind:
        def __init__(self) -> None:
            self.finalized: list[Any] = []

        def finalize_loading(self, config: Any) -> None:
            self.finalized.append(config)

    own = VllmKind()
    loads = iter([_artifact(inductor_fn), _artifact(own)])
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda *a, **k: next(loads))
    monkeypatch.setenv(lora_plugin.AOT_ENV, "1")
    with caplog.at_level(logging.INFO, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.apply_aot_load()
        lora_plugin.apply_aot_load()  # once only
        loaded: Any = torch.compiler.load_compiled_function(None)  # type: ignore[arg-type]
        loaded._artifacts.compiled_fn.finalize_loading("config")  # vLLM's call: no error
        assert loaded._artifacts.compiled_fn is inductor_fn
        again: Any = torch.compiler.load_compiled_function(None)  # type: ignore[arg-type]
        assert again._artifacts.compiled_fn is own
    own.finalize_loading("config")
    assert own.finalized == ["config"]  # its own method, not replaced
    assert caplog.text.count(lora_plugin.AOT_APPLIED) == 1


def test_without_the_setting_or_with_another_loader_torch_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import torch.compiler
    from vllm.compilation import decorators

    original = torch.compiler.load_compiled_function
    monkeypatch.setenv(lora_plugin.AOT_ENV, "0")
    lora_plugin.apply_aot_load()
    assert torch.compiler.load_compiled_function is original

    def other_loader(model: Any, path: str) -> None:
        return None

    monkeypatch.setattr(decorators, "_try_load_aot_compiled_fn", other_loader)
    monkeypatch.setenv(lora_plugin.AOT_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.retort_lora_fast_ops"):
        lora_plugin.apply_aot_load()
    assert torch.compiler.load_compiled_function is original
    assert "retort AOT load: NOT applied" in caplog.text
    assert "no longer calls compiled_fn.finalize_loading" in caplog.text


# --- a warm restart's warm-up: load the AOT artifact and run it small ------------------------


def test_the_aot_warmup_fits_this_vllm() -> None:
    assert lora_plugin.check_aot_warmup() == []


class _Runner:
    """vLLM's CPU model runner as the warm-up sees it: ``_dummy_run`` calls the model, whose
    ``__call__`` first tries vLLM's AOT loader and compiles where it returns nothing."""

    def __init__(self, mode: Any) -> None:
        self.vllm_config = SimpleNamespace(
            compilation_config=SimpleNamespace(mode=mode, inductor_compile_config={})
        )
        self.max_num_tokens = 2048
        self.ran: list[int] = []
        self.compiled: list[int] = []

    def _dummy_run(self, num_tokens: int) -> None:
        from vllm.compilation import decorators

        if decorators._try_load_aot_compiled_fn(self, "/cache/model") is None:
            self.compiled.append(num_tokens)  # vLLM would trace and compile here
        self.ran.append(num_tokens)


@pytest.mark.parametrize("cached", [True, False])
def test_the_small_warmup_runs_only_a_loaded_model(
    monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    from vllm.compilation import decorators
    from vllm.config import CompilationMode

    loaded = object()
    monkeypatch.setattr(
        decorators, "_try_load_aot_compiled_fn", lambda model, path: loaded if cached else None
    )
    shipped = decorators._try_load_aot_compiled_fn
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE", raising=False)
    runner = _Runner(CompilationMode.DYNAMO_TRACE_ONCE)
    assert lora_plugin._load_and_run(runner) is cached
    # Loaded: one run on the small batch. Nothing cached: stopped before anything was
    # traced, so that vLLM's own warm-up compiles on its generic shape.
    assert runner.ran == ([lora_plugin.AOT_WARMUP_TOKENS] if cached else [])
    assert runner.compiled == []
    assert decorators._try_load_aot_compiled_fn is shipped  # put back


@pytest.mark.parametrize(
    ("mode", "env"),
    [
        ("NONE", {}),  # eager: nothing to load, vLLM's warm-up returns at once anyway
        ("DYNAMO_TRACE_ONCE", {"VLLM_USE_AOT_COMPILE": "0"}),  # no AOT load is tried
        ("DYNAMO_TRACE_ONCE", {"VLLM_DISABLE_COMPILE_CACHE": "1"}),
    ],
)
def test_the_small_warmup_stays_out_where_vllm_loads_nothing(
    monkeypatch: pytest.MonkeyPatch, mode: str, env: dict[str, str]
) -> None:
    from vllm.config import CompilationMode

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = _Runner(getattr(CompilationMode, mode))
    assert lora_plugin._load_and_run(runner) is False
    assert runner.ran == []
