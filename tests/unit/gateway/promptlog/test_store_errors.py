"""The store's configuration errors (no database needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retort.db.store import PromptStore, StoreError


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql+aiomysql://x/y", "unsupported"),
        ("postgresql://u@h/db", "asyncpg"),
        ("sqlite:///x.db", "aiosqlite"),
        ("not a url", "invalid"),
    ],
)
def test_bad_urls_are_clear_errors(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        PromptStore(url)


def test_not_open_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not open"):
        _ = PromptStore(f"sqlite+aiosqlite:///{tmp_path}/x.db").engine
