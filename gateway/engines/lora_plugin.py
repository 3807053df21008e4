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
"""

from __future__ import annotations

import inspect
import logging
import os

__all__ = ["APPLIED", "ENV", "QUALNAME", "check_vllm", "enabled", "register"]

ENV = "RETORT_LORA_FAST_OPS"
"""``0``/``false``/``off``: leave vLLM's LoRA ops alone."""
QUALNAME = "gateway.engines.lora_ops.FastPunicaWrapperCPU"
_VLLM_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
APPLIED = "retort LoRA fast ops: applied"

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


def _log() -> logging.Logger:
    # Under vLLM's logger tree, which vLLM configures in its own processes too.
    return logging.getLogger("vllm.retort_lora_fast_ops")


def enabled() -> bool:
    """Whether ``RETORT_LORA_FAST_OPS`` allows the plugin (unset: yes)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
    if not enabled():
        log.info("retort LoRA fast ops: off (%s=%s)", ENV, os.environ.get(ENV))
        return
    try:
        from vllm.platforms import current_platform
    except ImportError:  # pragma: no cover - vLLM loads this plugin, so it imports
        return
    if not current_platform.is_cpu():
        return
    problems = check_vllm(current_platform)
    if not problems:
        try:
            from gateway.engines import lora_ops  # noqa: F401 - it must import before use
        except Exception as exc:
            problems.append(f"{QUALNAME} does not import: {exc!r}")
    if problems:
        log.warning(
            "retort LoRA fast ops: NOT applied, vLLM's LoRA ops stay as shipped: %s",
            "; ".join(problems),
        )
        return
    # One assignment: vLLM's get_punica_wrapper() resolves this name when it builds the model.
    setattr(type(current_platform), "get_punica_wrapper", classmethod(lambda cls: QUALNAME))  # noqa: B010
    log.info("%s (vLLM builds %s for LoRA)", APPLIED, QUALNAME)
