"""Resumable stages: each writes ``<stage>/stage.json`` (its inputs' fingerprint and result)
last, so a stage whose outputs exist and whose inputs match is skipped on the next run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["STAGE_FILE", "fingerprint", "stage_done", "write_stage"]

STAGE_FILE = "stage.json"


def fingerprint(inputs: Any) -> str:
    """A stable hash of a stage's inputs (Structs, paths, plain data)."""
    data = msgspec.json.encode(inputs, enc_hook=str, order="sorted")
    return hashlib.sha256(data).hexdigest()[:16]


def stage_done(stage: Path, inputs: Any) -> dict[str, Any] | None:
    """The stored result if ``stage`` finished with these inputs, else ``None``."""
    path = Path(stage) / STAGE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fingerprint(inputs):
        return None
    result = data.get("result")
    return result if isinstance(result, dict) else None


def write_stage(stage: Path, inputs: Any, result: dict[str, Any]) -> None:
    """Mark ``stage`` done (atomically), storing ``result``."""
    stage = Path(stage)
    stage.mkdir(parents=True, exist_ok=True)
    tmp = stage / f".{STAGE_FILE}.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint(inputs), "result": result}, indent=2))
    tmp.replace(stage / STAGE_FILE)
