"""LoRA adapters: the registry (validation before any engine sees one), training, CLI.

Importing this package is cheap: torch, transformers and peft are imported only by
training (:mod:`adapters.train`) and by the synthetic task data that benchmarks and tests
train on (:mod:`adapters.synthetic`).
"""

from adapters.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterValidationError,
)
from adapters.manifest import Manifest, read_manifest, write_manifest
from adapters.registry import AdapterEntry, AdapterRegistry

__all__ = [
    "AdapterEntry",
    "AdapterError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterPathError",
    "AdapterRegistry",
    "AdapterValidationError",
    "Manifest",
    "read_manifest",
    "write_manifest",
]
