from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.registry import AdapterRegistry
from adapters.synthetic import make_tiny_adapter
from tests.tiny import make_tiny_base

BASE_NAME = "tiny-base"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with a BPE tokenizer, in a folder named tiny-base."""
    return make_tiny_base(tmp_path_factory.mktemp("base") / BASE_NAME)


@pytest.fixture(scope="session")
def raw_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw peft folder (rank 8, q_proj+v_proj) for the tiny base; never modified."""
    return make_tiny_adapter(tiny_base, tmp_path_factory.mktemp("src") / "raw")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def registry(root: Path, tiny_base: Path) -> AdapterRegistry:
    return AdapterRegistry(root, BASE_NAME, tiny_base, max_lora_rank=16)


@pytest.fixture
def adapter(root: Path, raw_adapter: Path) -> Path:
    """A copy of the raw adapter inside the registry root (``root/a1``), free to mutate."""
    return Path(shutil.copytree(raw_adapter, root / "a1"))
