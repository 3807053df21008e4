from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from retort.db.record import LogRecord
from retort.db.store import PromptStore

# Issue #5's command contract: the keys `retort distill run` must write into report.json
# (spelled out here, not imported from distill, so the tests hold the code to it).
REPORT_KEYS = {
    "teacher_params",
    "student_params",
    "agreement",
    "rouge_l",
    "teacher_tokens_per_s",
    "student_tokens_per_s",
    "gate_passed",
    "student_model",
}


def record(i: int, question: str, answer: str, **fields: Any) -> LogRecord:
    base: dict[str, Any] = {
        "request_id": f"req-{i}",
        "created": 1_700_000_000.0 + i,
        "model": "base",
        "adapter": "bot",
        "endpoint": "chat",
        "messages": [{"role": "user", "content": question}],
        "completion": answer,
        "served_by": "engine",
        "status": "ok",
    }
    base.update(fields)
    return LogRecord(**base)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'retort.db'}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[PromptStore]:
    s = await PromptStore(db_url).open()
    try:
        yield s
    finally:
        await s.close()


__all__ = ["record", "time"]
