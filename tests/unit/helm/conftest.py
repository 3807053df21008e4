"""Fixtures: each named value set rendered once per session."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from ._chart import VALUE_SETS, Rendered, render


@functools.cache
def _render_set(name: str) -> Rendered:
    return render(VALUE_SETS[name], name)


@pytest.fixture(params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return _render_set(request.param)


@pytest.fixture
def render_set() -> Any:
    return _render_set
