"""The prestarted engine-core process (``gateway.engines.vllm_prestart``), with real spawned
processes: it runs the engine core's target only in the environment a spawned one would
have had, and otherwise steps aside for a spawned process and exits."""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import TYPE_CHECKING, Any

import pytest

from gateway.engines import vllm_prestart
from gateway.engines.vllm_prestart import (
    ENVIRON_FILE,
    PRESTARTED,
    _Context,
    _read,
    _record,
    _spawn_waiting,
    environ_delta,
    environ_file,
    prestart,
)
from gateway.settings import EngineSettings

if TYPE_CHECKING:
    from pathlib import Path

TIMEOUT_S = 60


def report(out: str) -> None:
    """A stand-in for vLLM's engine-core target: what process and environment it ran in."""
    import setproctitle

    setproctitle.setproctitle("VLLM::PrestartTest")  # as vLLM names its engine core
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as cmdline:
        title = cmdline.read().split(b"\0")[0].decode()
    with open(out, "w") as f:
        json.dump(
            {
                "title": title,
                "pid": os.getpid(),
                "mark": os.environ.get("PRESTART_TEST_MARK"),
                "late": os.environ.get("PRESTART_TEST_LATE"),
                "imported": "colorsys" in __import__("sys").modules,
            },
            f,
        )


def _run(tmp_path: Path, context: _Context) -> tuple[Any, dict[str, Any]]:
    out = tmp_path / "out.json"
    proc = context.Process(target=report, name="EngineCore", kwargs={"out": str(out)})
    proc.start()
    proc.join(TIMEOUT_S)
    assert proc.exitcode == 0
    return proc, json.loads(out.read_text())


def test_the_delta_names_what_changed_and_what_went() -> None:
    base = {"A": "1", "B": "2", "C": "3"}
    assert environ_delta(base, {"A": "1", "B": "x", "D": "4"}) == {"B": "x", "D": "4", "C": None}
    assert environ_delta(base, dict(base)) == {}


def test_the_file_lives_in_vllms_cache_root_by_vllms_rule(tmp_path: Path) -> None:
    root = tmp_path / "v"
    assert environ_file({"VLLM_CACHE_ROOT": str(root)}) == root / ENVIRON_FILE
    xdg = {"XDG_CACHE_HOME": str(tmp_path)}
    assert environ_file(xdg) == tmp_path / "vllm" / ENVIRON_FILE


def test_a_recorded_environment_reads_back_and_junk_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "deep" / ENVIRON_FILE
    assert _read(path) is None  # a first start: nothing recorded
    _record(path, {"OMP_NUM_THREADS": "1", "GONE": None})
    assert _read(path) == {"OMP_NUM_THREADS": "1", "GONE": None}
    for junk in ("not json", "[1, 2]", '{"A": 1}'):
        path.write_text(junk)
        assert _read(path) is None


def test_the_prestarted_process_runs_the_target_in_the_environment_of_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = dict(os.environ)
    delta = {"PRESTART_TEST_MARK": "bound"}
    waiting = _spawn_waiting(delta, ("colorsys",))
    assert "PRESTART_TEST_MARK" not in os.environ  # only the child started with it
    # What the gateway sets before vLLM spawns: the same delta, and a late variable that
    # the prestarted process gets with the target.
    monkeypatch.setenv("PRESTART_TEST_MARK", "bound")
    context = _Context(multiprocessing.get_context("spawn"), waiting, base)
    caplog.set_level("INFO", logger="retort.engine")
    proc, seen = _run(tmp_path, context)
    assert seen["pid"] == waiting.proc.pid == proc.pid  # no process spawned for it
    assert seen == {
        "title": "VLLM::PrestartTest",
        "pid": proc.pid,
        "mark": "bound",
        "late": None,
        "imported": True,
    }
    assert PRESTARTED in caplog.text


def test_a_different_environment_spawns_as_before_and_the_waiting_process_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = dict(os.environ)
    waiting = _spawn_waiting({"PRESTART_TEST_MARK": "old"}, ("colorsys",))
    monkeypatch.setenv("PRESTART_TEST_MARK", "new")  # e.g. another OpenMP binding
    monkeypatch.setenv("PRESTART_TEST_LATE", "x")
    context = _Context(multiprocessing.get_context("spawn"), waiting, base)
    caplog.set_level("INFO", logger="retort.engine")
    proc, seen = _run(tmp_path, context)
    assert seen["pid"] == proc.pid != waiting.proc.pid
    assert seen["mark"] == "new"
    assert seen["imported"] is False  # a fresh process
    assert waiting.proc.exitcode == 0  # read EOF and left
    assert "differs in PRESTART_TEST_LATE, PRESTART_TEST_MARK" in caplog.text
    assert PRESTARTED not in caplog.text


def test_a_process_that_died_is_replaced_by_a_spawned_one(tmp_path: Path) -> None:
    waiting = _spawn_waiting({}, ("no_such_module_for_retort",))  # its import fails
    waiting.proc.join(TIMEOUT_S)
    assert waiting.proc.exitcode == 1
    context = _Context(multiprocessing.get_context("spawn"), waiting, dict(os.environ))
    proc, seen = _run(tmp_path, context)
    assert seen["pid"] == proc.pid != waiting.proc.pid


def test_only_the_engine_core_takes_the_prestarted_process(tmp_path: Path) -> None:
    waiting = _spawn_waiting({}, ())
    context = _Context(multiprocessing.get_context("spawn"), waiting, dict(os.environ))
    other = context.Process(target=report, name="DPCoordinator", kwargs={"out": "-"})
    assert other.pid is None  # an ordinary unstarted process of vLLM's context
    _, seen = _run(tmp_path, context)
    assert seen["pid"] == waiting.proc.pid


def test_nothing_is_prestarted_without_a_recorded_environment_or_off_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(vllm_prestart, "_waiting", None)
    monkeypatch.setattr(vllm_prestart, "_base", None)
    assert prestart(EngineSettings(kind="vllm")) is False  # a first start
    assert vllm_prestart._base == dict(os.environ)  # remembered, to record at spawn
    _record(environ_file(), {})
    assert prestart(EngineSettings(kind="fake")) is False
    assert prestart(EngineSettings(kind="vllm", prestart_engine_core=False)) is False
    assert prestart(EngineSettings(kind="vllm", cpu_worker_in_engine_core=False)) is False
    assert vllm_prestart._waiting is None
