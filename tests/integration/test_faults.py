"""Serving faults against a real gateway process with the fake engine (the engine is not the
point here; the gateway's behaviour is): slow and vanishing clients, many idle streams,
overload, and adapter or student files that go bad. Engine death with the real vLLM-CPU
engine is ``test_engine_death.py``. The scenarios live in :mod:`loadtest.faults`, which
also runs them at the published sizes (BENCHMARKS.md, "Faults")."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from loadtest.faults import (
    FAKE_MODEL,
    engine_gauge,
    fake_gateway,
    idle_streams,
    overload,
    raise_fd_limit,
    stalled_reader,
    vanishing_client,
)
from retort.db.filters import RowFilter
from retort.db.store import PromptStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from loadtest.servers import Server

pytestmark = pytest.mark.integration

STALL_S = 1.0
CAPACITY = 4
SERVICE_TOKENS = 100
TOKEN_DELAY_S = 0.002  # a request of SERVICE_TOKENS takes about 0.2 s
MAX_WAIT_S = 1.0
IDLE_STREAMS = 200  # the benchmark opens 1,000 (python -m loadtest.faults)


def rows(home: Path, **filters: Any) -> list[dict[str, Any]]:
    async def query() -> list[dict[str, Any]]:
        async with PromptStore(f"sqlite+aiosqlite:///{home}/retort.db") as store:
            return await store.query(RowFilter(**filters))

    return asyncio.run(query())


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A gateway whose engine runs CAPACITY sequences, with a short stall bound."""
    root = tmp_path_factory.mktemp("faults")
    config = {
        "server": {"stream_stall_s": STALL_S},
        "engine": {
            "fake_token_delay_s": TOKEN_DELAY_S,
            "max_model_len": 2_000_000,
            "max_num_seqs": CAPACITY,
            "max_queue": CAPACITY,
            "max_queue_wait_s": MAX_WAIT_S,
        },
    }
    with fake_gateway(root, "busy", config) as gw:
        yield gw, root / "busy-home"


# -- slow and vanishing clients ---------------------------------------------------------------


def test_a_client_that_reads_nothing_is_cut_and_its_engine_request_aborted(
    busy: tuple[Server, Path],
) -> None:
    gw, home = busy
    # 4 choices at 2 ms a token: about 300 KB/s of events, far more than the socket holds.
    result = stalled_reader(gw, n=CAPACITY, timeout_s=60)
    assert result.bytes_read > 0, "the stream had started"
    assert result.cut_after_s is not None, "the engine request was never aborted"
    assert result.cut_after_s >= STALL_S
    # Backpressure: what waits is bounded by the socket buffers, not the output (MBs).
    assert result.rss_growth_bytes < 32 * 2**20, result
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert "retort_stream_stalls_total 1.0" in metrics
    # The record is written by the prompt log's writer, a moment after the cut.
    deadline = time.monotonic() + 30
    while True:
        errors = rows(home, status="error")
        stalled = [r for r in errors if "stopped reading" in (r["error"] or "")]
        if stalled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(stalled) == 1, rows(home)
    assert stalled[0]["completion_tokens"] > 0


def test_a_client_that_closes_mid_stream_aborts_its_engine_request(
    busy: tuple[Server, Path],
) -> None:
    gw, _ = busy
    took = vanishing_client(gw, timeout_s=10)
    assert took is not None, "the engine kept running the abandoned request"
    assert engine_gauge(gw.url) == 0


# -- overload ---------------------------------------------------------------------------------


def test_overload_is_refused_with_retry_after_and_admitted_latency_stays_bounded(
    busy: tuple[Server, Path],
) -> None:
    gw, home = busy
    service_s = SERVICE_TOKENS * TOKEN_DELAY_S
    rate = 4 * CAPACITY / service_s  # 4x what the engine can serve
    seconds = 3.0
    since = time.time()
    result = overload(gw, rate=rate, seconds=seconds, max_tokens=SERVICE_TOKENS)
    assert result.other == {}, result  # only 200s and 503 + Retry-After
    assert result.ok > 0
    assert result.refused > 0
    assert result.ok + result.refused == result.offered
    # Never an unbounded queue: the engine itself never queues (the gateway admits at most
    # its capacity), the gateway's own queue stays within engine.max_queue, and an admitted
    # request waits at most MAX_WAIT_S before its own service. An unbounded queue at 4x
    # would hold its last requests about seconds x 3 = 9 s; the bound leaves room for a
    # loaded machine's slower service.
    assert result.engine_waiting_max == 0, result
    assert result.gateway_waiting_max <= CAPACITY, result
    assert result.ok_p99_s < MAX_WAIT_S + seconds * 3 / 2, result
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'retort_admission_rejected_total{reason="full"}' in metrics
    assert engine_gauge(gw.url) == 0
    # Every request, refused or not, has its log record.
    deadline = time.monotonic() + 20
    while len(logged := rows(home, since=since)) < result.offered and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(logged) == result.offered
    assert sum(r["status"] == "error" for r in logged) == result.refused


# -- many idle streams ------------------------------------------------------------------------


def test_many_idle_streams_and_new_requests_are_still_served(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    raise_fd_limit(4 * IDLE_STREAMS + 256)  # client and server sockets, inherited by it
    root = tmp_path_factory.mktemp("idle")
    config = {"engine": {"fake_token_delay_s": 3600, "max_model_len": 20_000}}
    with fake_gateway(root, "idle", config) as gw:
        result = idle_streams(gw, IDLE_STREAMS)
    assert result.running_open == IDLE_STREAMS, result
    assert result.new_request_status == 200, result
    assert result.idle_after_close_s is not None, "closed streams must abort their requests"
    assert 0 < result.bytes_per_stream < 1 * 2**20, result


# -- bad files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path, Path]]:
    """A gateway with LoRA on (fake engine) and students; a tiny base to make adapters for,
    and a real exported tiny student."""
    from distill.export import build_onnx
    from tests.tiny import make_tiny_base

    root = tmp_path_factory.mktemp("files")
    base = make_tiny_base(root / "tiny-base", seed=3, hidden_size=64)
    onnx = build_onnx(base, root / "onnx", "fp32")
    config = {"engine": {"enable_lora": True, "fake_token_delay_s": 0.02}}
    with fake_gateway(root, "files", config) as gw:
        yield gw, root / "files-home", base, onnx


def _install_adapter(home: Path, base: Path, name: str) -> Path:
    from adapters.registry import AdapterRegistry
    from adapters.synthetic import make_tiny_adapter

    registry = AdapterRegistry(
        home / "adapters", base_model_name=FAKE_MODEL, base_model_path=None, max_lora_rank=16
    )
    with registry.staging(name) as staged:
        make_tiny_adapter(base, staged, rank=4, base_name=FAKE_MODEL)
        registry.install(staged, name, source="test")
    return home / "adapters" / name


def _stream_across(url: str, model: str, damage: Callable[[], None]) -> str:
    """Stream a completion from ``model``, calling ``damage`` once its first event is in."""
    body = {"model": model, "prompt": "go", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        damage()
        return "\n".join([first, *lines]).strip()


def _completion(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize("damage", ["replaced", "deleted"])
def test_adapter_files_going_bad_in_use_fail_the_next_load_not_the_request(
    files: tuple[Server, Path, Path, Path], damage: str
) -> None:
    gw, home, base, _ = files
    name = f"style-{damage}"
    folder = _install_adapter(home, base, name)

    def spoil() -> None:
        if damage == "replaced":
            (folder / "adapter_model.safetensors").write_bytes(b"not the weights")
        else:
            shutil.rmtree(folder)

    text = _stream_across(gw.url, name, spoil)  # loaded on demand, then spoilt mid-stream
    assert text.endswith("data: [DONE]"), text
    assert '"error"' not in text, "a request in flight completes"
    # The next load (after an unload) gets a clear error, never a 500.
    r = httpx.post(gw.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
    assert r.status_code == 200, r.text
    r = _completion(gw.url, name)
    if damage == "replaced":
        assert r.status_code == 400, r.text
        assert "adapter_model.safetensors" in r.json()["error"]["message"]
    else:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"


def test_student_half_written_or_changed_fails_its_load_clearly(
    files: tuple[Server, Path, Path, Path],
) -> None:
    from gateway.students import MANIFEST_FILE, StudentRegistry

    gw, home, _, onnx = files
    registry = StudentRegistry(home / "students")
    entry = registry.publish("stu", onnx, teacher_model=FAKE_MODEL, precision="fp32")
    # A publish interrupted: the files are there, the manifest (written last) is not.
    half = home / "students" / "half"
    shutil.copytree(entry.path, half)
    (half / MANIFEST_FILE).unlink()
    r = _completion(gw.url, "half")
    assert r.status_code == 404, r.text
    assert MANIFEST_FILE in r.json()["error"]["message"]
    # A student whose model file was cut short after its publish.
    cut = home / "students" / "cut"
    shutil.copytree(entry.path, cut)
    manifest = (cut / MANIFEST_FILE).read_text().replace('"stu"', '"cut"')
    (cut / MANIFEST_FILE).write_text(manifest)
    model = max((p for p in cut.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    model.write_bytes(model.read_bytes()[:1000])
    r = _completion(gw.url, "cut")
    assert r.status_code == 404, r.text
    assert "does not match its sha256" in r.json()["error"]["message"]
    # A loaded student whose files are deleted while it serves: the request in flight
    # completes (the model is in memory); the next load says what is missing.
    r = httpx.post(gw.url + "/admin/students", json={"name": "stu"}, timeout=60)
    assert r.status_code == 200, r.text
    text = _stream_across(gw.url, "stu", lambda: shutil.rmtree(entry.path / "onnx"))
    assert text.endswith("data: [DONE]"), text
    assert '"error"' not in text
    r = httpx.delete(gw.url + "/admin/students/stu", timeout=60)
    assert r.status_code == 200, r.text
    r = _completion(gw.url, "stu")
    assert r.status_code == 404, r.text
    assert "stu" in r.json()["error"]["message"]
