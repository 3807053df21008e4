"""vLLM-CPU's worker in the engine-core process: when it applies, and the environment the
engine core is spawned in (vLLM's own binding for its worker, restored afterwards)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from gateway.engines.vllm_cpu import (
    IMPORT_CPUS_ENV,
    UNIPROC_EXECUTOR,
    rebind,
    unbind_imports,
    worker_binding,
    worker_in_engine_core,
)
from gateway.settings import EngineSettings

MP_ON: dict[str, str] = {}


def applies(on_cpu: bool = True, environ: dict[str, str] | None = None, **engine: Any) -> bool:
    settings = EngineSettings(**engine)
    return worker_in_engine_core(
        settings, on_cpu=on_cpu, environ=MP_ON if environ is None else environ
    )


def test_applies_by_default_on_the_cpu_with_one_worker() -> None:
    assert EngineSettings().cpu_worker_in_engine_core
    assert applies()
    assert applies(environ={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert applies(extra={"data_parallel_size": 1, "swap_space": 1})


@pytest.mark.parametrize(
    ("why", "on_cpu", "environ", "engine"),
    [
        ("turned off", True, {}, {"cpu_worker_in_engine_core": False}),
        ("not the CPU backend", False, {}, {}),
        ("tensor parallel", True, {}, {"tensor_parallel_size": 2}),
        ("pipeline parallel", True, {}, {"pipeline_parallel_size": 2}),
        ("data parallel", True, {}, {"extra": {"data_parallel_size": 2}}),
        ("local data parallel", True, {}, {"extra": {"data_parallel_size_local": 2}}),
        ("executor chosen", True, {}, {"extra": {"distributed_executor_backend": "mp"}}),
        ("engine core in the gateway", True, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, {}),
    ],
)
def test_vllm_keeps_its_layout_when(
    why: str, on_cpu: bool, environ: dict[str, str], engine: dict[str, Any]
) -> None:
    assert not applies(on_cpu, environ, **engine), why


def test_the_executor_is_vllms_in_process_one_by_a_name_the_platform_keeps() -> None:
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    assert UNIPROC_EXECUTOR != "uni"  # vLLM-CPU rewrites "uni" to "mp"
    executor = resolve_obj_by_qualname(UNIPROC_EXECUTOR)
    assert issubclass(executor, UniProcExecutor)
    assert executor._init_executor is not UniProcExecutor._init_executor  # rebinds first


def _in_a_thread(fn: Any) -> Any:
    """Run ``fn`` in a fresh thread (CPU affinity is per thread) and return its result."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to bind to one")
def test_imports_run_unbound_and_the_model_on_the_binding_it_started_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = os.sched_getaffinity(0)
    first = {min(allowed)}

    def engine_core() -> tuple[set[int], str | None, set[int]]:
        os.sched_setaffinity(0, first)  # as the OpenMP runtime binds the first thread
        unbind_imports()
        importing = os.sched_getaffinity(0), os.environ.get("GOMP_CPU_AFFINITY")
        rebind()
        return *importing, os.sched_getaffinity(0)

    monkeypatch.setenv(IMPORT_CPUS_ENV, ",".join(map(str, sorted(allowed))))
    monkeypatch.setenv("GOMP_CPU_AFFINITY", str(min(allowed)))
    importing, hidden, running = _in_a_thread(engine_core)
    assert importing == allowed
    assert hidden is None  # no OpenMP runtime loaded while importing binds the thread again
    assert running == first
    assert os.environ["GOMP_CPU_AFFINITY"] == str(min(allowed))
    assert IMPORT_CPUS_ENV not in os.environ  # the child takes it for itself

    # Anywhere else (the variable unset) neither call changes the binding.
    def elsewhere() -> set[int]:
        os.sched_setaffinity(0, first)
        unbind_imports()
        rebind()
        return os.sched_getaffinity(0)

    assert _in_a_thread(elsewhere) == first


def test_the_binding_is_vllms_for_its_worker_and_is_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if not current_platform.is_cpu():
        pytest.skip("the OpenMP binding is vLLM-CPU's")
    # As vLLM-CPU's platform config leaves it: PyTorch's libgomp preloaded.
    monkeypatch.setenv("LD_PRELOAD", "/opt/torch/lib/libgomp-a34b3233.so.1")
    for key in (
        "OMP_NUM_THREADS",
        "GOMP_CPU_AFFINITY",
        "VLLM_CPU_OMP_THREADS_BIND",
        IMPORT_CPUS_ENV,
    ):
        monkeypatch.delenv(key, raising=False)
    config = VllmConfig()
    expected = OMPProcessManager(config).cpu_lists[0]  # the worker of rank 0
    assert expected

    with worker_binding(config):
        assert os.environ["OMP_NUM_THREADS"] == str(len(expected))
        assert os.environ["GOMP_CPU_AFFINITY"] == " ".join(map(str, expected))
        assert os.environ[IMPORT_CPUS_ENV] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    for key in ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", IMPORT_CPUS_ENV):
        assert key not in os.environ
