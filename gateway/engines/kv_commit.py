"""vLLM-CPU's KV cache: mapped zero at start, its memory committed in the background.

vLLM allocates the KV cache as one int8 buffer, ``torch.zeros(buf_size, dtype=torch.int8)``
(``vllm.v1.worker.utils.allocate_kv_cache``). Zeroing writes every page of it before
``/ready``: the default 2 GiB took about 5 s of each start on this machine, where the host
backs a VM's memory on first touch (BENCHMARKS.md 9e).

Memory the kernel maps anonymously is zero already. With ``engine.kv_cache_commit:
background`` (the default; the engine core gets ``RETORT_KV_COMMIT``), the model runner's
call of ``allocate_kv_cache`` runs inside :class:`MappedZeros`, a torch dispatch mode that
answers that one ``torch.zeros`` with a private anonymous mapping: the same zero bytes, none
of them touched; vLLM lays its per-layer views over it as over its own buffer. A low-
priority thread then commits the pages with ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14),
which faults them in writable without writing them, so it is safe while the engine already
writes the cache. The cache is resident a few seconds after ``/ready``, as it was before it,
so a memory limit too small for it still fails right after a start, not later under load.
The log says :data:`APPLIED` at the allocation and :data:`COMMITTED` once the pages are in.

It changes nothing (vLLM zeroes as shipped, and the log says why) with ``start``, where the
kernel cannot populate that way, or where vLLM's allocation is not the one this was written
against (:func:`check`). It applies where the engine core runs the model
(``engine.cpu_worker_in_engine_core``, :mod:`gateway.engines.vllm_cpu_executor`).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import logging
import mmap
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "APPLIED",
    "COMMITTED",
    "ENV",
    "RUNNER_ALLOCATE",
    "MappedZeros",
    "apply",
    "check",
    "commit",
    "enabled",
]

ENV = "RETORT_KV_COMMIT"
"""``background`` (unset: the same) or ``start`` (vLLM zeroes the cache before ``/ready``)."""
APPLIED = "retort KV cache: mapped"
COMMITTED = "retort KV cache: committed"
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module names it from 3.13
_CHUNK = 16 << 20
"""Pages committed per madvise call (about 40 ms here): the most an exit waits for it."""
_EXITING = "the process exits"
_MIN_BYTES = 1 << 20
"""Smaller int8 zeros stay torch's own (the cache of a real model is far larger)."""
_PATCHED = "_retort_kv_commit"
# What vLLM 0.32's allocation does that the mapping answers.
_ZEROS = "torch.zeros(buf_size, dtype=torch.int8, device=device)"
_CALL = "kv_caches = allocate_kv_cache("
RUNNER_ALLOCATE = "allocate_kv_cache"
"""The name ``vllm.v1.worker.gpu_model_runner`` calls vLLM's allocation by (imported from
``vllm.v1.worker.utils``), which CPUModelRunner inherits: what :func:`apply` wraps."""

_libc: Any = None


def _log() -> logging.Logger:
    return logging.getLogger("vllm.retort_kv_commit")


def enabled() -> bool:
    """Whether ``RETORT_KV_COMMIT`` asks for the background commit (unset: yes)."""
    return os.environ.get(ENV, "background").strip().lower() != "start"


def _madvise(address: int, length: int, advice: int) -> int:
    """``madvise(2)`` through ctypes, which lets go of the GIL for the call: 0, or errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    rc = _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(advice))
    return ctypes.get_errno() if rc != 0 else 0


def _populate_supported() -> str | None:
    """None where the kernel populates with ``MADV_POPULATE_WRITE``; else why not."""
    probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = (ctypes.c_char * mmap.PAGESIZE).from_buffer(probe)
        err = _madvise(ctypes.addressof(view), mmap.PAGESIZE, _MADV_POPULATE_WRITE)
        del view
    finally:
        probe.close()
    return f"madvise(MADV_POPULATE_WRITE): {os.strerror(err)}" if err else None


class MappedZeros(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """A dispatch mode that answers a ``torch.zeros`` of a 1-d int8 CPU buffer (at least
    1 MiB) with a private anonymous mapping, zero by the kernel's guarantee and untouched;
    every other operation runs as it would. :attr:`mapped` holds each buffer it made."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.mapped: list[torch.Tensor] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.zeros.default and self._is_buffer(args, kwargs):
            size = int(args[0][0])
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf = torch.frombuffer(mapping, dtype=torch.int8)  # holds the mapping
            self.mapped.append(buf)
            return buf
        return func(*args, **kwargs)

    @staticmethod
    def _is_buffer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        size = args[0] if args else kwargs.get("size")
        device = kwargs.get("device")
        return (
            isinstance(size, (list, tuple))
            and len(size) == 1
            and int(size[0]) >= _MIN_BYTES
            and kwargs.get("dtype") == torch.int8
            and (device is None or torch.device(device).type == "cpu")
            and not kwargs.get("pin_memory")
            and kwargs.get("layout") in (None, torch.strided)
        )


def commit(buf: torch.Tensor) -> tuple[float, str | None]:
    """Fault every page of ``buf`` in, writable, without writing it; run in this thread at
    the lowest priority. Returns the seconds it took and None, or why it stopped."""
    with contextlib.suppress(AttributeError, OSError):  # Linux: this thread's nice value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    started = time.monotonic()
    address, size = buf.data_ptr(), buf.numel() * buf.element_size()
    main = threading.main_thread()
    for offset in range(0, size, _CHUNK):
        if not main.is_alive():  # the process is exiting: stop between two calls
            return time.monotonic() - started, _EXITING
        err = _madvise(address + offset, min(_CHUNK, size - offset), _MADV_POPULATE_WRITE)
        if err:
            return time.monotonic() - started, os.strerror(err)
    return time.monotonic() - started, None


def _commit_in_background(buf: torch.Tensor) -> None:
    def run() -> None:
        seconds, error = commit(buf)
        gib = buf.numel() / (1 << 30)
        if error == _EXITING:
            return
        if error:
            _log().warning(
                "retort KV cache: commit stopped after %.1f s (%s); the rest of its %.2f GiB "
                "is committed as the cache fills",
                seconds,
                error,
                gib,
            )
        else:
            _log().info("%s %.2f GiB in %.1f s, in the background", COMMITTED, gib, seconds)

    # Not a daemon: one that is still inside a ctypes call as the interpreter finalizes
    # aborts the process ("PyEval_SaveThread: ... the GIL is released"). The process's exit
    # stops the main thread before it joins the others, and commit() stops at its next chunk.
    threading.Thread(target=run, name="retort-kv-commit", daemon=False).start()


def check() -> list[str]:
    """What differs between this vLLM's CPU KV allocation and what the mapping expects."""
    try:
        from vllm.v1.worker import gpu_model_runner, utils
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError as exc:
        return [f"vLLM's CPU model runner does not import: {exc}"]
    problems: list[str] = []
    allocate = getattr(utils, RUNNER_ALLOCATE, None)
    current = getattr(gpu_model_runner, RUNNER_ALLOCATE, None)
    if current is not allocate:
        if getattr(current, _PATCHED, False):
            return []  # applied already
        problems.append("the model runner no longer allocates with utils.allocate_kv_cache")
    for what, fn, needle in (
        ("utils.allocate_kv_cache", allocate, _ZEROS),
        (
            "CPUModelRunner.initialize_kv_cache_tensors",
            getattr(CPUModelRunner, "initialize_kv_cache_tensors", None),
            _CALL,
        ),
    ):
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            source = ""
        if needle not in source:
            problems.append(f"{what} no longer runs {needle}")
    return problems


def apply() -> None:
    """In the process that runs the model, once its modules are imported: the model
    runner's KV allocation maps its buffer and commits it in the background (see the
    module's docstring), unless ``RETORT_KV_COMMIT=start`` or it does not fit."""
    log = _log()
    if not enabled():
        log.info("retort KV cache: zeroed at start (%s=%s)", ENV, os.environ.get(ENV))
        return
    from vllm.v1.worker import gpu_model_runner

    original: Callable[..., dict[str, torch.Tensor]] = getattr(gpu_model_runner, RUNNER_ALLOCATE)
    if getattr(original, _PATCHED, False):
        return  # applied already: no second check or kernel probe
    problems = check()
    why_not = None if problems else _populate_supported()
    if problems or why_not:
        log.warning(
            "retort KV cache: NOT mapped, vLLM zeroes it at start: %s",
            "; ".join(problems) or why_not,
        )
        return

    def allocate_kv_cache(
        kv_cache_config: Any, device: Any, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        if torch.device(device).type != "cpu":
            return original(kv_cache_config, device, *args, **kwargs)
        mode = MappedZeros()
        with mode:
            caches = original(kv_cache_config, device, *args, **kwargs)
        if caches and not mode.mapped:
            log.warning("retort KV cache: not mapped, vLLM allocated no int8 buffer to map")
        for buf in mode.mapped:
            log.info("%s (%.2f GiB, zero and untouched)", APPLIED, buf.numel() / (1 << 30))
            _commit_in_background(buf)
        return caches

    setattr(allocate_kv_cache, _PATCHED, True)
    allocate_kv_cache.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(gpu_model_runner, RUNNER_ALLOCATE, allocate_kv_cache)
