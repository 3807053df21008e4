"""Errors raised by the adapter registry, validation and training.

Every error carries ``reason``: one human sentence naming what is wrong and, where it
helps, what to do. The gateway maps :class:`AdapterValidationError` (and its subclass
:class:`AdapterPathError`) to 400, :class:`AdapterNotFoundError` to 404 and
:class:`AdapterExistsError` to 409.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterPathError",
    "AdapterValidationError",
]


class AdapterError(Exception):
    """Base class of every adapter-registry error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class AdapterValidationError(AdapterError, ValueError):
    """The adapter is unsafe or does not fit the served base model; nothing was loaded."""


class AdapterPathError(AdapterValidationError):
    """A name or path that does not resolve inside the registry root."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No adapter of that name in the registry."""


class AdapterExistsError(AdapterError):
    """An adapter of that name already exists (pass ``overwrite`` to replace it)."""
