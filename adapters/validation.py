"""Check an adapter folder before any engine sees it.

Only headers and small JSON files are read; tensors are never loaded and nothing is ever
unpickled. The checks, in order (the first failure is reported):

1. the folder exists; no file in it is pickle-based (``.bin``, ``.pt``, ``.pth``, ``.pkl``,
   ``.ckpt``... or pickle/zip magic bytes) and no symlink in it points outside it;
2. ``adapter_config.json`` and ``adapter_model.safetensors`` are present;
3. the config is a plain LoRA (no DoRA, ``modules_to_save``, biases, per-module ranks);
4. its rank is at most ``max_lora_rank``;
5. its ``base_model_name_or_path`` names the served base model;
6. the safetensors header parses and its layout is sound;
7. every tensor is a ``lora_A``/``lora_B`` pair on a declared target module, with shapes
   ``(r, in_features)`` and ``(out_features, r)`` matching the base model's weights, and
   every target module exists in the base;
8. the weights' sha256 matches ``retort.json`` (when present; otherwise it is computed).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import AdapterValidationError
from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, read_manifest
from adapters.safetensors_header import TensorInfo, read_header, sniff_pickle
from retort.files import sha256_file

__all__ = [
    "FORBIDDEN_SUFFIXES",
    "BaseModelInfo",
    "adapter_base_name",
    "file_sha256",
    "validate_adapter",
]

log = logging.getLogger("retort.adapters")

FORBIDDEN_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
"""File suffixes of pickle-based formats: refused wherever they appear in an adapter."""

_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_MAX_CONFIG_BYTES = 1 << 20
_MAX_FILES = 1000
# Config keys whose non-empty values mean "not a plain LoRA the engine can serve".
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "LoRA biases",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer_replication",
}


@dataclass
class BaseModelInfo:
    """The served base model: its name, and (when local) the folder its weights are in.

    ``modules()`` maps each 2-D weight's module path (``model.layers.0.self_attn.q_proj``)
    to its shape ``(out_features, in_features)``, read once from the safetensors headers.
    """

    name: str
    """The served model name (what clients send in ``model``)."""
    path: Path | None = None
    """Local folder of the base; ``None`` skips the checks that need its weights."""
    _modules: dict[str, tuple[int, int]] | None = field(default=None, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def accepts(self, declared: str) -> bool:
        """Whether an adapter's ``base_model_name_or_path`` names this base."""
        declared = declared.strip()
        if not declared:
            return False
        names = {self.name, _basename(self.name)}
        if self.path is not None:
            names |= {str(self.path), self.path.name}
        if declared in names or _basename(declared) in names:
            return True
        if self.path is not None and os.path.isabs(declared):
            return os.path.realpath(declared) == os.path.realpath(self.path)
        return False

    def modules(self) -> dict[str, tuple[int, int]] | None:
        """Module path -> (out, in) for every 2-D weight, or ``None`` when unknown."""
        with self._lock:
            if not self._loaded:
                self._modules = _read_base_modules(self.path) if self.path else None
                self._loaded = True
            return self._modules


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _read_base_modules(folder: Path) -> dict[str, tuple[int, int]] | None:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({folder / str(s) for s in weight_map.values()})
        elif single.is_file():
            shards = [single]
        else:
            log.warning("no safetensors weights in %s: target/shape checks skipped", folder)
            return None
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            tensors.update(read_header(shard))
    except (OSError, ValueError, KeyError, TypeError, AdapterValidationError) as exc:
        log.warning("cannot read the base model's weights in %s (%s): checks skipped", folder, exc)
        return None
    return {
        key.removesuffix(".weight"): (info.shape[0], info.shape[1])
        for key, info in tensors.items()
        if key.endswith(".weight") and len(info.shape) == 2
    }


# sha256 by file identity: a file whose inode, size, mtime and ctime are unchanged is not
# hashed again (ctime changes on any write or rename and cannot be set by a user).
_hash_cache: dict[str, tuple[tuple[int, ...], str]] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """Hex sha256 of ``path``, read in 1 MiB blocks (cached by the file's identity)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _hash_lock:
        hit = _hash_cache.get(real)
    if hit is not None and hit[0] == ident:
        return hit[1]
    digest = sha256_file(real)
    with _hash_lock:
        _hash_cache[real] = (ident, digest)
    return digest


def _scan(folder: Path) -> list[Path]:
    """Every file in ``folder`` (recursively); refuse pickle formats and escaping symlinks."""
    real_root = os.path.realpath(folder)
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(folder)
            if p.is_symlink():
                target = os.path.realpath(p)
                if os.path.commonpath([real_root, target]) != real_root:
                    raise AdapterValidationError(f"{rel} is a symlink outside the adapter folder")
            if name in filenames:
                if p.suffix.lower() in FORBIDDEN_SUFFIXES:
                    raise AdapterValidationError(
                        f"{rel} is a pickle-based file ({p.suffix}); only safetensors "
                        "weights are accepted (re-save with safe_serialization=True)"
                    )
                files.append(p)
        if len(files) > _MAX_FILES:
            raise AdapterValidationError(f"more than {_MAX_FILES} files in the adapter folder")
    for p in files:
        if p.suffix == ".safetensors":
            if p.name != WEIGHTS_FILE:
                raise AdapterValidationError(
                    f"unexpected weights file {p.relative_to(folder)}: an adapter holds "
                    f"exactly one, {WEIGHTS_FILE}"
                )
            continue
        try:
            with p.open("rb") as f:
                kind = sniff_pickle(f.read(4))
        except OSError as exc:
            raise AdapterValidationError(f"cannot read {p.relative_to(folder)}: {exc}") from exc
        if kind is not None:
            raise AdapterValidationError(
                f"{p.relative_to(folder)} holds {kind}; pickle is never loaded"
            )
    return files


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise AdapterValidationError(f"{CONFIG_FILE} is larger than 1 MiB")
        config = json.loads(raw)
    except OSError as exc:
        raise AdapterValidationError(f"cannot read {CONFIG_FILE}: {exc.strerror}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} is not a JSON object")
    return config


def adapter_base_name(config: dict[str, Any]) -> str:
    """The base model an adapter config declares (``base_model_name_or_path``), or ``""``."""
    value = config.get("base_model_name_or_path")
    return value if isinstance(value, str) else ""


def _check_config(config: dict[str, Any], max_lora_rank: int) -> tuple[int, float, Any]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterValidationError(f"peft_type is {peft_type!r}; only LORA adapters are served")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterValidationError(f"{what} is not supported ({key} in {CONFIG_FILE})")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"bias={config['bias']!r} is not supported (only 'none')")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterValidationError(f"{CONFIG_FILE} has no valid rank r (got {rank!r})")
    if rank > max_lora_rank:
        raise AdapterValidationError(
            f"rank {rank} exceeds the engine's max_lora_rank {max_lora_rank}"
        )
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterValidationError(f"{CONFIG_FILE} has an invalid lora_alpha {alpha!r}")
    targets = config.get("target_modules")
    valid_list = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (valid_list or (isinstance(targets, str) and targets)):
        raise AdapterValidationError(f"{CONFIG_FILE} has no valid target_modules")
    return rank, float(alpha), targets


def _target_matches(target: str, module: str) -> bool:
    """peft's rule for a list entry: the module path equals it or ends with ``.target``."""
    return module == target or module.endswith("." + target)


def _check_weights(
    tensors: dict[str, TensorInfo],
    rank: int,
    targets: list[str] | str,
    base_modules: dict[str, tuple[int, int]] | None,
) -> list[str]:
    """Check the LoRA tensors; return the leaf names of the modules they modify."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterValidationError(
                f"unsupported tensor {key!r}: only LoRA lora_A/lora_B weights are served"
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise AdapterValidationError(f"tensor {key!r} has dtype {info.dtype}, not a float")
        if len(info.shape) != 2:
            raise AdapterValidationError(f"tensor {key!r} has shape {list(info.shape)}, not 2-D")
        pairs.setdefault(m["module"], {})[m["which"]] = info
    if not pairs:
        raise AdapterValidationError(f"{WEIGHTS_FILE} holds no LoRA weights")
    leaves: set[str] = set()
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterValidationError(f"module {module} has no {missing} weight")
        a, b = ab["lora_A"].shape, ab["lora_B"].shape
        if a[0] != rank or b[1] != rank:
            raise AdapterValidationError(
                f"module {module}: lora_A {list(a)} and lora_B {list(b)} do not have "
                f"rank {rank} (the config's r)"
            )
        declared = (
            any(_target_matches(t, module) for t in targets)
            if isinstance(targets, list)
            else targets == "all-linear" or re.fullmatch(targets, module) is not None
        )
        if not declared:
            raise AdapterValidationError(
                f"module {module} has weights but is not among target_modules {targets}"
            )
        if base_modules is not None:
            if module not in base_modules:
                raise AdapterValidationError(f"module {module} does not exist in the base model")
            out_f, in_f = base_modules[module]
            if a[1] != in_f or b[0] != out_f:
                raise AdapterValidationError(
                    f"module {module}: lora_A {list(a)} and lora_B {list(b)} do not fit the "
                    f"base weight ({out_f}, {in_f}); expected ({rank}, {in_f}) and "
                    f"({out_f}, {rank})"
                )
        leaves.add(module.rsplit(".", 1)[-1])
    if base_modules is not None and isinstance(targets, list):
        for t in targets:
            if not any(_target_matches(t, m) for m in base_modules):
                raise AdapterValidationError(
                    f"target module {t!r} does not exist in the base model"
                )
    return sorted(leaves)


def validate_adapter(
    folder: Path,
    *,
    base: BaseModelInfo,
    max_lora_rank: int,
    name: str | None = None,
    source: str | None = None,
) -> Manifest:
    """Validate the adapter in ``folder`` against ``base``; return its manifest.

    When ``retort.json`` is absent (a raw peft folder), the manifest is synthesized with
    ``name`` (default: the folder name) and ``source`` (default ``imported:<folder>``).

    Raises:
        AdapterValidationError: the first check that fails, with a human reason.
    """
    if not folder.exists():
        raise AdapterValidationError(f"adapter folder {folder.name!r} does not exist")
    if not folder.is_dir():
        raise AdapterValidationError(f"{folder.name!r} is not a folder")
    _scan(folder)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise AdapterValidationError(f"missing {' and '.join(missing)} in {folder.name!r}")
    config = _read_config(folder)
    rank, alpha, targets = _check_config(config, max_lora_rank)
    declared_base = adapter_base_name(config)
    if not base.accepts(declared_base):
        raise AdapterValidationError(
            f"the adapter was trained for base model {declared_base or '(none given)'!r}, "
            f"not the served {base.name!r}"
        )
    tensors = read_header(folder / WEIGHTS_FILE)
    leaves = _check_weights(tensors, rank, targets, base.modules())
    target_modules = sorted(targets) if isinstance(targets, list) else leaves
    sha = file_sha256(folder / WEIGHTS_FILE)
    manifest = read_manifest(folder)
    if manifest is None:
        st = (folder / WEIGHTS_FILE).stat()
        return Manifest(
            name=name or folder.name,
            base_model=_basename(declared_base),
            rank=rank,
            alpha=alpha,
            target_modules=target_modules,
            sha256=sha,
            created=st.st_mtime,
            source=source or f"imported:{folder}",
        )
    if manifest.sha256 != sha:
        raise AdapterValidationError(
            f"checksum mismatch: {WEIGHTS_FILE} has sha256 {sha[:12]}..., "
            f"{MANIFEST_FILE} records {manifest.sha256[:12]}..."
        )
    if manifest.rank != rank or sorted(manifest.target_modules) != target_modules:
        raise AdapterValidationError(
            f"{MANIFEST_FILE} (rank {manifest.rank}, targets {manifest.target_modules}) "
            f"disagrees with {CONFIG_FILE} (rank {rank}, targets {target_modules})"
        )
    return manifest
