"""``retort.json``: the registry's manifest beside each adapter's weights.

It records what the adapter is (name, base model, rank, alpha, target modules), the sha256
of ``adapter_model.safetensors`` (checked before every load), when and how it was made
(``trained`` or ``imported:<source path>``) and optional metrics (final training loss...).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import msgspec

from adapters.errors import AdapterValidationError

__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "Manifest",
    "atomic_write_bytes",
    "read_manifest",
    "set_adapter_base",
    "write_manifest",
]

MANIFEST_FILE = "retort.json"
"""The manifest's file name inside an adapter folder."""
CONFIG_FILE = "adapter_config.json"
"""peft's adapter configuration."""
WEIGHTS_FILE = "adapter_model.safetensors"
"""The adapter's weights: safetensors only."""

_MAX_MANIFEST_BYTES = 1 << 20


class Manifest(msgspec.Struct, kw_only=True):
    """What the registry knows about one adapter (``retort.json``)."""

    name: str
    """Registry name: the folder name, and the ``model`` clients send."""
    base_model: str
    """The base model it was trained on (served name or folder basename)."""
    rank: int
    """LoRA rank ``r``."""
    alpha: float
    """LoRA ``alpha`` (scaling is ``alpha / rank``)."""
    target_modules: list[str]
    """Base-model module names the adapter modifies (``q_proj``, ``v_proj``...)."""
    sha256: str
    """Hex sha256 of ``adapter_model.safetensors``."""
    created: float
    """Unix time the adapter entered the registry."""
    source: str
    """``trained``, or ``imported:<path it was imported from>``."""
    metrics: dict[str, float] | None = None
    """Optional numbers about it (``final_loss``, ``train_seconds``...)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (mode 0644): a temporary file beside it, fsync,
    rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from a gateway run as another user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/retort.json`` atomically and return its path."""
    path = folder / MANIFEST_FILE
    atomic_write_bytes(path, msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")
    return path


def read_manifest(folder: Path) -> Manifest | None:
    """``folder/retort.json``, or ``None`` when absent.

    Raises:
        AdapterValidationError: the file exists but is unreadable or malformed.
    """
    path = folder / MANIFEST_FILE
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AdapterValidationError(f"cannot read {MANIFEST_FILE}: {exc.strerror}") from exc
    if len(data) > _MAX_MANIFEST_BYTES:
        raise AdapterValidationError(f"{MANIFEST_FILE} is larger than 1 MiB")
    try:
        return msgspec.json.decode(data, type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AdapterValidationError(f"{MANIFEST_FILE} is malformed: {exc}") from exc


def set_adapter_base(folder: Path, base_model: str) -> None:
    """Rewrite ``base_model_name_or_path`` in ``folder/adapter_config.json`` (atomically).

    Adapters are saved with the base's local path (so peft never looks it up on a hub),
    then given the portable name the registry checks: the base's served or folder name.
    """
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
