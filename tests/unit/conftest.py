"""Unit tests never touch the real state folder: ``RETORT_HOME`` is a fresh temp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("retort-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETORT_HOME", str(home))
    yield home
    mp.undo()
