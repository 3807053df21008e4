"""Real services in tests: a missing one skips the test (saying what to install), except
under CI (``CI=true``), where it fails, so that a green CI run has run every test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import NoReturn, TypeVar

import pytest

from loadtest.servers import ServiceMissing

__all__ = ["missing", "service"]

T = TypeVar("T")


def missing(reason: str) -> NoReturn:
    """Skip (fail under ``CI=true``): a service or tool the test needs is not here."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service fails)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def service(started: AbstractContextManager[T]) -> Iterator[T]:
    """``with service(redis_server()) as url``: the service, stopped afterwards;
    :func:`missing` when its binary is not installed."""
    try:
        with started as value:
            yield value
    except ServiceMissing as exc:
        missing(str(exc))
