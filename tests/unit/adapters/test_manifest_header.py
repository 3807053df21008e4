from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from adapters.errors import AdapterValidationError
from adapters.manifest import Manifest, read_manifest, write_manifest
from adapters.safetensors_header import TensorInfo, read_header, sniff_pickle


def _manifest(**over: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "a",
        "base_model": "base",
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ["q_proj"],
        "sha256": "0" * 64,
        "created": 1.5,
        "source": "trained",
        "metrics": {"final_loss": 0.25},
    }
    fields.update(over)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_manifest_round_trip_atomic(tmp_path: Path) -> None:
    m = _manifest()
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert [p.name for p in tmp_path.iterdir()] == ["retort.json"]
    data = json.loads((tmp_path / "retort.json").read_text())
    assert data["source"] == "trained"
    assert read_manifest(tmp_path / "missing") is None


def test_manifest_accepts_int_alpha_and_ignores_unknown_fields(tmp_path: Path) -> None:
    data = {**json.loads(_encode(_manifest())), "alpha": 16, "future": True}
    (tmp_path / "retort.json").write_text(json.dumps(data))
    m = read_manifest(tmp_path)
    assert m is not None
    assert m.alpha == 16.0


def _encode(m: Manifest) -> str:
    import msgspec

    return msgspec.json.encode(m).decode()


def _st(tmp_path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_read_header(tmp_path: Path) -> None:
    path = _st(
        tmp_path,
        {
            "__metadata__": {"format": "pt"},
            "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]},
            "a": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]},
        },
        b"\0" * 12,
    )
    assert read_header(path) == {"a": TensorInfo("F32", (2, 1)), "b": TensorInfo("BF16", (2,))}


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "4 bytes for F32"),
        ({"a": {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, 4, "out of bounds"),
        ({"a": [1]}, 0, "not an object"),
    ],
)  # fmt: skip
def test_read_header_rejects(
    tmp_path: Path, header: dict[str, object], size: int, expected: str
) -> None:
    with pytest.raises(AdapterValidationError, match=expected):
        read_header(_st(tmp_path, header, b"\0" * size))


def test_sniff_pickle() -> None:
    assert sniff_pickle(b"PK\x03\x04") is not None
    assert sniff_pickle(b"\x80\x04\x95") == "pickle (protocol 4)"
    assert sniff_pickle(b"\x89PNG") is None
    assert sniff_pickle(b"{") is None


def test_header_length_with_pickle_like_bytes_is_still_safetensors(tmp_path: Path) -> None:
    # A header of 0x280 bytes starts with 80 02, like pickle protocol 2: must still parse.
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (0x280 - len(raw))
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_header(path) == {"a": TensorInfo("F32", (1,))}
