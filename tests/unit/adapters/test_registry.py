from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterValidationError,
)
from adapters.manifest import MANIFEST_FILE, WEIGHTS_FILE, read_manifest
from adapters.registry import AdapterRegistry
from adapters.synthetic import make_tiny_adapter
from tests.tiny import make_tiny_base

from .conftest import BASE_NAME


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _reason(registry: AdapterRegistry, folder: Path) -> str:
    with pytest.raises(AdapterValidationError) as info:
        registry.validate(folder)
    return info.value.reason


# --------------------------------------------------------------------- the valid case


def test_valid_raw_adapter(registry: AdapterRegistry, adapter: Path) -> None:
    m = registry.validate(adapter)
    assert (m.name, m.base_model, m.rank, m.alpha) == ("a1", BASE_NAME, 8, 16.0)
    assert m.target_modules == ["q_proj", "v_proj"]
    assert m.sha256 == _sha(adapter / WEIGHTS_FILE)
    assert m.source == f"imported:{adapter}"
    assert m.metrics is None


def test_validation_reads_headers_only_and_is_fast(
    registry: AdapterRegistry, adapter: Path
) -> None:
    registry.validate(adapter)  # the base's header is read once, then cached
    t0 = time.perf_counter()
    for _ in range(10):
        registry.validate(adapter)
    assert (time.perf_counter() - t0) / 10 < 0.05


@pytest.mark.parametrize(
    "declared",
    [BASE_NAME, f"/somewhere/else/{BASE_NAME}", f"HuggingFaceTB/{BASE_NAME}", f"{BASE_NAME}/"],
)
def test_base_accepted_by_name_or_basename(
    registry: AdapterRegistry, adapter: Path, declared: str
) -> None:
    _edit_config(adapter, base_model_name_or_path=declared)
    registry.validate(adapter)


def test_base_accepted_by_served_name(root: Path, tiny_base: Path, adapter: Path) -> None:
    _edit_config(adapter, base_model_name_or_path="org/served-alias")
    AdapterRegistry(root, "served-alias", tiny_base, max_lora_rank=16).validate(adapter)


def test_base_accepted_by_full_path(registry: AdapterRegistry, adapter: Path) -> None:
    assert registry.base.path is not None
    _edit_config(adapter, base_model_name_or_path=str(registry.base.path))
    registry.validate(adapter)


# --------------------------------------------------------------------- paths


def test_resolve_name_and_inside_paths(registry: AdapterRegistry, adapter: Path) -> None:
    real = Path(os.path.realpath(adapter))
    assert registry.resolve("a1") == real
    assert registry.resolve(str(adapter)) == real
    assert registry.resolve("not-yet") == Path(os.path.realpath(registry.root)) / "not-yet"


@pytest.mark.parametrize(
    "given", ["../x", "a1/../a1", "..", "", "/etc", ".", ".staging-x", "a1/.hidden"]
)
def test_resolve_rejects(registry: AdapterRegistry, adapter: Path, given: str) -> None:
    with pytest.raises(AdapterPathError):
        registry.resolve(given)


def test_resolve_rejects_absolute_path_outside_root(
    registry: AdapterRegistry, raw_adapter: Path
) -> None:
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        registry.resolve(str(raw_adapter))


def test_resolve_rejects_symlink_escaping_root(
    registry: AdapterRegistry, raw_adapter: Path
) -> None:
    (registry.root / "sneaky").symlink_to(raw_adapter, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        registry.resolve("sneaky")
    assert registry.get("sneaky") is None
    [entry] = registry.list()
    assert entry.name == "sneaky"
    assert not entry.valid


def test_resolve_follows_symlink_inside_root(registry: AdapterRegistry, adapter: Path) -> None:
    (registry.root / "alias").symlink_to(adapter, target_is_directory=True)
    assert registry.resolve("alias") == Path(os.path.realpath(adapter))


def test_symlinked_weights_escaping_the_folder(
    registry: AdapterRegistry, adapter: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(adapter / WEIGHTS_FILE, outside)
    (adapter / WEIGHTS_FILE).symlink_to(outside)
    assert "outside the adapter folder" in _reason(registry, adapter)


# --------------------------------------------------------------------- bad adapters


def _corrupt_header(folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 20) + b'{"a": {"dtype": 12}}')


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[:-100])


def _pad(folder: Path) -> None:
    with (folder / WEIGHTS_FILE).open("ab") as f:
        f.write(b"\0" * 16)


def _garbage(folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(os.urandom(4096))


def _tiny_file(folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(b"abc")


def _torch_save(folder: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, folder / WEIGHTS_FILE)


def _raw_pickle(folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps({"w": [0.0] * 64}, protocol=4))


def _bin_beside(folder: Path) -> None:
    (folder / "adapter_model.bin").write_bytes(b"whatever")


def _pt_in_subfolder(folder: Path) -> None:
    (folder / "extra").mkdir()
    (folder / "extra" / "optimizer.pt").write_bytes(b"whatever")


def _pickle_disguised(folder: Path) -> None:
    (folder / "notes.txt").write_bytes(pickle.dumps(["x"], protocol=2))


def _second_safetensors(folder: Path) -> None:
    shutil.copy(folder / WEIGHTS_FILE, folder / "new_embeddings.safetensors")


def _no_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def _no_weights(folder: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()


def _no_files(folder: Path) -> None:
    _no_config(folder)
    _no_weights(folder)


def _bad_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{not json")


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("corrupt header", _corrupt_header, "not a valid safetensors file"),
    ("truncated", _truncate, "out of bounds"),
    ("trailing bytes", _pad, "after the last tensor"),
    ("garbage", _garbage, "not a valid safetensors file"),
    ("tiny file", _tiny_file, "only 3 bytes"),
    ("torch.save weights", _torch_save, "pickle"),
    ("raw pickle weights", _raw_pickle, "pickle (protocol 4)"),
    (".bin present", _bin_beside, "adapter_model.bin is a pickle-based file (.bin)"),
    (".pt in a subfolder", _pt_in_subfolder, "optimizer.pt is a pickle-based file"),
    ("pickle under another name", _pickle_disguised, "notes.txt holds pickle"),
    ("second weights file", _second_safetensors, "unexpected weights file"),
    ("missing config", _no_config, "missing adapter_config.json in"),
    ("missing weights", _no_weights, f"missing {WEIGHTS_FILE} in"),
    ("missing both", _no_files, f"missing adapter_config.json and {WEIGHTS_FILE}"),
    ("config not json", _bad_json, "not valid JSON"),
    ("wrong base", lambda f: _edit_config(f, base_model_name_or_path="org/other-model"),
     "trained for base model 'org/other-model', not the served 'tiny-base'"),
    ("no base", lambda f: _edit_config(f, base_model_name_or_path=None), "(none given)"),
    ("rank vs weights", lambda f: _edit_config(f, r=4), "do not have rank 4"),
    ("unknown target", lambda f: _edit_config(f, target_modules=["q_proj", "v_proj", "fc_in"]),
     "target module 'fc_in' does not exist in the base model"),
    ("undeclared weights", lambda f: _edit_config(f, target_modules=["q_proj"]),
     "is not among target_modules"),
    ("dora", lambda f: _edit_config(f, use_dora=True), "DoRA is not supported"),
    ("modules_to_save", lambda f: _edit_config(f, modules_to_save=["lm_head"]),
     "modules_to_save"),
    ("not lora", lambda f: _edit_config(f, peft_type="IA3"), "only LORA"),
    ("bad rank", lambda f: _edit_config(f, r="8"), "no valid rank"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_adapters(
    registry: AdapterRegistry, adapter: Path, mutate: Callable[[Path], None], expected: str
) -> None:
    mutate(adapter)
    assert expected in _reason(registry, adapter)


def test_missing_folder(registry: AdapterRegistry) -> None:
    assert "does not exist" in _reason(registry, registry.root / "nope")


def test_rank_too_high(root: Path, tiny_base: Path, adapter: Path) -> None:
    registry = AdapterRegistry(root, BASE_NAME, tiny_base, max_lora_rank=4)
    assert _reason(registry, adapter) == "rank 8 exceeds the engine's max_lora_rank 4"


def test_shape_mismatch(registry: AdapterRegistry, tmp_path: Path) -> None:
    # Same name, same modules, other widths: an adapter for another model of that name.
    other = make_tiny_base(tmp_path / "other" / BASE_NAME, hidden_size=32)
    folder = make_tiny_adapter(other, registry.root / "narrow")
    reason = _reason(registry, folder)
    assert "do not fit the base weight (64, 64)" in reason
    assert "lora_A [8, 32]" in reason


def test_checksum_mismatch(registry: AdapterRegistry, raw_adapter: Path) -> None:
    registry.import_(raw_adapter, "a2")
    weights = registry.root / "a2" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor: the header stays valid
    weights.write_bytes(bytes(data))
    assert "checksum mismatch" in _reason(registry, registry.root / "a2")


def test_manifest_disagreeing_with_config(registry: AdapterRegistry, raw_adapter: Path) -> None:
    registry.import_(raw_adapter, "a2")
    path = registry.root / "a2" / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["rank"] = 4
    path.write_text(json.dumps(data))
    assert "disagrees" in _reason(registry, registry.root / "a2")


def test_malformed_manifest(registry: AdapterRegistry, adapter: Path) -> None:
    (adapter / MANIFEST_FILE).write_text('{"name": 3}')
    assert "retort.json is malformed" in _reason(registry, adapter)


def test_no_base_folder_skips_shape_checks(root: Path, adapter: Path) -> None:
    registry = AdapterRegistry(root, BASE_NAME, None, max_lora_rank=16)
    _edit_config(adapter, target_modules=["q_proj", "v_proj", "fc_in"])
    assert registry.validate(adapter).rank == 8
    _edit_config(adapter, base_model_name_or_path="other")
    assert "trained for base model" in _reason(registry, adapter)


# --------------------------------------------------------------------- import / list / remove


def test_import_list_get_remove(registry: AdapterRegistry, raw_adapter: Path) -> None:
    m = registry.import_(raw_adapter, "style-a")
    folder = registry.root / "style-a"
    assert m.name == "style-a"
    assert m.source == f"imported:{os.path.realpath(raw_adapter)}"
    assert m.sha256 == _sha(folder / WEIGHTS_FILE)
    assert read_manifest(folder) == m
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / MANIFEST_FILE).stat().st_mode & 0o777 == 0o644
    assert registry.validate(folder) == m
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        WEIGHTS_FILE,
        MANIFEST_FILE,
    ]
    registry.import_(raw_adapter, "style-b")
    (registry.root / "broken").mkdir()
    (registry.root / ".staging-leftover").mkdir()
    (registry.root / "stray-file").write_text("x")
    entries = registry.list()
    assert [e.name for e in entries] == ["broken", "style-a", "style-b"]
    assert [e.valid for e in entries] == [False, True, True]
    assert entries[0].error is not None
    assert "missing" in entries[0].error
    entry = registry.get("style-a")
    assert entry is not None
    assert entry.manifest == m
    for absent in ("nope", "../style-a", "style-a/..", "/etc", ".staging-leftover"):
        assert registry.get(absent) is None
    registry.remove("style-a")
    assert not folder.exists()
    assert registry.get("style-a") is None
    with pytest.raises(AdapterNotFoundError):
        registry.remove("style-a")
    with pytest.raises(AdapterPathError):
        registry.remove("../style-b")
    assert not any(p.name.startswith((".trash", ".staging-style")) for p in registry.root.iterdir())


def test_import_keeps_source_metrics(registry: AdapterRegistry, raw_adapter: Path) -> None:
    first = registry.import_(raw_adapter, "a")
    assert first.metrics is None
    folder = registry.root / "a"
    from adapters.manifest import write_manifest

    write_manifest(folder, type(first)(**{**_fields(first), "metrics": {"final_loss": 0.5}}))
    again = registry.import_(folder, "b")
    assert again.metrics == {"final_loss": 0.5}
    assert again.source == f"imported:{os.path.realpath(folder)}"


def _fields(m: object) -> dict[str, object]:
    import msgspec

    return {f.name: getattr(m, f.name) for f in msgspec.structs.fields(type(m))}  # type: ignore[arg-type]


def test_import_refuses_existing_name_unless_overwrite(
    registry: AdapterRegistry, raw_adapter: Path, tmp_path: Path
) -> None:
    first = registry.import_(raw_adapter, "a")
    with pytest.raises(AdapterExistsError):
        registry.import_(raw_adapter, "a")
    other = make_tiny_adapter(registry.base.path or tmp_path, tmp_path / "other", seed=1)
    second = registry.import_(other, "a", overwrite=True)
    assert second.sha256 != first.sha256
    assert registry.validate(registry.root / "a").sha256 == second.sha256


def test_import_invalid_leaves_nothing(
    registry: AdapterRegistry, raw_adapter: Path, tmp_path: Path
) -> None:
    bad = Path(shutil.copytree(raw_adapter, tmp_path / "bad"))
    _raw_pickle(bad)
    with pytest.raises(AdapterValidationError, match="pickle"):
        registry.import_(bad, "bad")
    with pytest.raises(AdapterPathError):
        registry.import_(raw_adapter, "../escape")
    with pytest.raises(AdapterPathError):
        registry.import_(raw_adapter, ".hidden")
    assert [p.name for p in registry.root.iterdir() if not p.name.endswith(".lock")] == []
