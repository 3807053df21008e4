"""File helpers every registry shares: the one sha256 and the one name rule."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["NAME_RE", "is_valid_name", "sha256_file"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Valid adapter and student names: they are folder names and the ``model`` clients send
(letters, digits, ``.``, ``_``, ``-``; at most 128; not starting with ``.``)."""


def is_valid_name(name: str) -> bool:
    """Whether ``name`` follows :data:`NAME_RE` (the whole name)."""
    return NAME_RE.fullmatch(name) is not None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
