"""The KV cache mapped zero and committed in the background (gateway.engines.kv_commit),
against vLLM's own allocation and this machine's kernel."""

from __future__ import annotations

import logging
import mmap
import subprocess
import sys
import time

import msgspec
import pytest
import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker import gpu_model_runner
from vllm.v1.worker.utils import allocate_kv_cache

from gateway.engines import kv_commit
from gateway.engines.vllm import engine_environ
from gateway.settings import EngineSettings, load_settings

MiB = 1 << 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def _config(layers: list[str], blocks: int) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    page = spec.page_size_bytes
    tensor = KVCacheTensor(
        size=page * blocks * len(layers),
        layers=layers,
        layer_stride=page * blocks,
        block_stride=page,
    )
    return KVCacheConfig(
        num_blocks=blocks,
        kv_cache_tensors=[tensor],
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
    )


def test_background_is_the_default_and_reaches_the_engine_core() -> None:
    assert load_settings(environ={}).engine.kv_cache_commit == "background"
    assert engine_environ(EngineSettings())[kv_commit.ENV] == "background"
    assert engine_environ(EngineSettings(kv_cache_commit="start"))[kv_commit.ENV] == "start"
    with pytest.raises(msgspec.ValidationError, match="kv_cache_commit"):
        msgspec.convert({"kv_cache_commit": "lazy"}, EngineSettings)


def test_enabled_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kv_commit.ENV, raising=False)
    assert kv_commit.enabled()
    monkeypatch.setenv(kv_commit.ENV, "start")
    assert not kv_commit.enabled()
    monkeypatch.setenv(kv_commit.ENV, "background")
    assert kv_commit.enabled()


def test_this_vllm_allocates_as_the_mapping_expects() -> None:
    assert kv_commit.check() == []


def test_this_kernel_populates_without_writing() -> None:
    assert kv_commit._populate_supported() is None


def test_vllms_allocation_under_the_mode_maps_one_untouched_zero_buffer() -> None:
    blocks, layers = 256, ["layer.0", "layer.1", "layer.2", "layer.3"]
    config = _config(layers, blocks)
    size = config.kv_cache_tensors[0].size
    assert size >= 16 * MiB
    before = _resident_bytes()
    mode = kv_commit.MappedZeros()
    with mode:
        caches = allocate_kv_cache(config, torch.device("cpu"), KVCacheLayout.LBHNC)
    assert _resident_bytes() - before < size // 4  # mapped, not written
    (buf,) = mode.mapped
    assert buf.dtype == torch.int8
    assert buf.numel() == size
    assert set(caches) == set(layers)
    for layer in layers:  # vLLM's views address the mapping
        start = caches[layer].untyped_storage().data_ptr()
        assert buf.data_ptr() <= start < buf.data_ptr() + size
    assert not bool(buf.any())  # the kernel's zero pages: what torch.zeros gave
    caches["layer.2"].fill_(1.5)
    per_layer = size // len(layers) // 4
    assert buf.view(torch.float32).sum().item() == pytest.approx(1.5 * per_layer)


def test_the_mode_leaves_every_other_allocation_to_torch() -> None:
    mode = kv_commit.MappedZeros()
    with mode:
        small = torch.zeros(1024, dtype=torch.int8)
        floats = torch.zeros(4 * MiB, dtype=torch.float32)
        square = torch.zeros(2048, 2048, dtype=torch.int8)
        ones = torch.ones(4 * MiB, dtype=torch.int8)
    assert mode.mapped == []
    assert not small.any()
    assert not floats.any()
    assert not square.any()
    assert bool(ones.all())


def test_commit_makes_the_pages_resident_and_keeps_what_was_written() -> None:
    size = 192 * MiB
    mode = kv_commit.MappedZeros()
    with mode:
        buf = torch.zeros(size, dtype=torch.int8)
    marks = [0, 5 * MiB + 3, 100 * MiB, size - 1]
    for i, at in enumerate(marks, start=1):
        buf[at] = i
    before = _resident_bytes()
    seconds, error = kv_commit.commit(buf)
    assert error is None
    assert seconds >= 0
    assert _resident_bytes() - before > size * 9 // 10
    assert [int(buf[at]) for at in marks] == [1, 2, 3, 4]
    assert int(buf.count_nonzero()) == len(marks)


_EXIT_WHILE_COMMITTING = """
import logging, sys, torch
from gateway.engines import kv_commit
logging.basicConfig(level=logging.INFO)
with kv_commit.MappedZeros() as mode:
    torch.zeros(1 << 30, dtype=torch.int8)
kv_commit._commit_in_background(mode.mapped[0])
print("exiting", flush=True)
sys.exit(3)
"""


def test_a_process_that_exits_while_committing_exits_cleanly() -> None:
    # The engine core stops while its cache is still being committed (a stop right after a
    # start): a daemon thread inside a ctypes call then aborted the interpreter's
    # finalization ("Fatal Python error: PyEval_SaveThread").
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WHILE_COMMITTING],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout == "exiting\n"
    assert "Fatal Python error" not in done.stderr, done.stderr
    assert done.returncode == 3, done.stderr
    assert kv_commit.COMMITTED not in done.stderr  # it stopped, and said nothing


def test_apply_maps_the_model_runners_allocation_and_commits_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = getattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE)
    assert original is allocate_kv_cache
    monkeypatch.setattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE, original)
    monkeypatch.delenv(kv_commit.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.retort_kv_commit"):
        kv_commit.apply()
        wrapped = getattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE)
        assert wrapped is not original
        assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
        assert kv_commit.check() == []
        kv_commit.apply()  # once
        assert getattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE) is wrapped
        # What CPUModelRunner.initialize_kv_cache_tensors calls, as it calls it.
        config = _config(["layer.0", "layer.1"], 1024)
        size = config.kv_cache_tensors[0].size
        before = _resident_bytes()
        caches = wrapped(config, torch.device("cpu"), KVCacheLayout.LBHNC, [16])
        assert kv_commit.APPLIED in caplog.text
        assert not bool(caches["layer.1"].any())
        deadline = time.monotonic() + 60
        while kv_commit.COMMITTED not in caplog.text:
            assert time.monotonic() < deadline, "never committed"
            time.sleep(0.05)
    assert _resident_bytes() - before > size * 9 // 10


def test_start_leaves_vllms_zeroing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = getattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE)
    monkeypatch.setattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE, original)
    monkeypatch.setenv(kv_commit.ENV, "start")
    with caplog.at_level(logging.INFO, logger="vllm.retort_kv_commit"):
        kv_commit.apply()
    assert getattr(gpu_model_runner, kv_commit.RUNNER_ALLOCATE) is original
    assert "zeroed at start" in caplog.text
