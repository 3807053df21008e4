"""Read a safetensors file's header (names, dtypes, shapes) without loading any tensor.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` (plus an optional
``__metadata__``), then the raw data. :func:`read_header` checks the whole layout against
the file size (offsets in bounds, sizes matching dtype x shape, no gaps or overlaps), so a
truncated or corrupt file is caught here, before any engine opens it. Nothing is ever
unpickled: :func:`sniff_pickle` only looks at magic bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterValidationError

__all__ = ["DTYPE_BYTES", "TensorInfo", "read_header", "sniff_pickle"]

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""Bytes per element of each safetensors dtype."""

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


def sniff_pickle(head: bytes) -> str | None:
    """Name the pickle-based format ``head`` (a file's first bytes) starts with, if any."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format, which holds pickle)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle (protocol {head[1]})"
    return None


def _fail(path: Path, what: str) -> AdapterValidationError:
    return AdapterValidationError(f"{path.name} is not a valid safetensors file: {what}")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check ``path``'s safetensors header; return its tensors by name.

    Raises:
        AdapterValidationError: unreadable, pickle instead of safetensors, or corrupt.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"only {size} bytes long")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or n + 8 > size:
                kind = sniff_pickle(prefix)
                if kind is not None:
                    raise AdapterValidationError(
                        f"{path.name} holds {kind}, not safetensors; pickle is never loaded"
                    )
                raise _fail(path, f"header length {n} does not fit in a {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise AdapterValidationError(f"cannot read {path.name}: {exc.strerror}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        kind = sniff_pickle(prefix)
        if kind is not None:
            raise AdapterValidationError(
                f"{path.name} holds {kind}, not safetensors; pickle is never loaded"
            ) from exc
        raise _fail(path, "the header is not JSON") from exc
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _fail(path, f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_len
        ):
            raise _fail(path, f"tensor {name!r} has data offsets {offsets!r} out of bounds")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _fail(path, f"tensor {name!r}: {end - begin} bytes for {dtype} {shape}")
        tensors[name] = TensorInfo(dtype, tuple(shape))
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise _fail(path, f"tensor {name!r} overlaps another or leaves a gap")
        cursor = end
    if cursor != data_len:
        raise _fail(path, f"{data_len - cursor} bytes after the last tensor (truncated or padded)")
    return tensors


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
