"""Resumable stages: each writes ``<stage>/stage.json`` (its inputs' fingerprint and result)
last, so a stage whose outputs exist and whose inputs match is skipped on the next run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import msgspec

__all__ = ["STAGE_FILE", "fingerprint", "stage_done", "write_stage"]

R = TypeVar("R", bound=msgspec.Struct)

STAGE_FILE = "stage.json"


def fingerprint(inputs: Any) -> str:
    """A stable hash of a stage's inputs (Structs, paths, plain data)."""
    data = msgspec.json.encode(inputs, enc_hook=str, order="sorted")
    return hashlib.sha256(data).hexdigest()[:16]


def stage_done(stage: Path, inputs: Any, kind: type[R]) -> R | None:
    """The stored result if ``stage`` finished with these inputs, else ``None`` (also when
    the stored result no longer reads as ``kind``: the stage runs again)."""
    path = Path(stage) / STAGE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint(inputs):
        return None
    try:
        return msgspec.convert(data.get("result"), kind, strict=False)
    except msgspec.ValidationError:
        return None


def write_stage(stage: Path, inputs: Any, result: msgspec.Struct) -> None:
    """Mark ``stage`` done (atomically), storing ``result``."""
    stage = Path(stage)
    stage.mkdir(parents=True, exist_ok=True)
    tmp = stage / f".{STAGE_FILE}.tmp"
    record = {"fingerprint": fingerprint(inputs), "result": msgspec.to_builtins(result)}
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(stage / STAGE_FILE)
