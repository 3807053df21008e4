"""Start, watch and stop the servers a benchmark measures: each in its own process group.

:func:`running` starts servers together, waits until every one is ready, and on the way
out (error or not) stops them all: SIGTERM to the server, which shuts its engine down, then
SIGKILL to its process group and to every descendant seen. :class:`RssSampler` records
the peak resident memory of a server's process tree while a block runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

import httpx
import psutil

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from types import TracebackType

    from gateway.settings import EngineSettings

__all__ = [
    "RssSampler",
    "Server",
    "ServerError",
    "ServerSpec",
    "free_port",
    "gateway_spec",
    "running",
    "vllm_server_spec",
]

LOG_TAIL_CHARS = 3000


class ServerError(RuntimeError):
    """A server exited or did not get ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to start one server: the command line, its port and its readiness probe."""

    name: str
    argv: list[str]
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    cpus: str | None = None
    """``taskset -c`` CPU list to pin the server (and its children) to."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return ["taskset", "-c", self.cpus, *self.argv] if self.cpus else list(self.argv)


def gateway_spec(
    name: str,
    config: Path,
    port: int,
    *,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
) -> ServerSpec:
    """``retort serve`` with a YAML config."""
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    argv += ["--port", str(port), "--host", "127.0.0.1"]
    return ServerSpec(name, argv, port, "/ready", env or {}, cpus)


def vllm_server_spec(
    name: str, model: str, served_name: str, port: int, engine: EngineSettings
) -> ServerSpec:
    """vLLM's own OpenAI server with the engine arguments the gateway would pass.

    Mirrors ``gateway.engines.vllm.engine_args`` (and its CPU rule: ``dtype: auto`` means
    float32 on the CPU backend) plus ``VLLM_CPU_KVCACHE_SPACE``. Access logs are off in both.
    """
    dtype = engine.dtype
    if dtype == "auto" and shutil.which("nvidia-smi") is None:
        dtype = "float32"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", dtype, "--seed", str(engine.seed)]
    argv += ["--tensor-parallel-size", str(engine.tensor_parallel_size)]
    argv += ["--pipeline-parallel-size", str(engine.pipeline_parallel_size)]
    argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    argv += ["--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if engine.max_model_len is not None:
        argv += ["--max-model-len", str(engine.max_model_len)]
    if engine.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.enforce_eager:
        argv.append("--enforce-eager")
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if engine.cpu_kv_cache_space_gb is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(engine.cpu_kv_cache_space_gb)))
    return ServerSpec(name, argv, port, "/health", env)


class Server:
    """A started server process (the leader of a new process group)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            spec.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **spec.env},
            start_new_session=True,
        )
        self._seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return self.spec.url

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        return ""

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"{self.spec.name} exited with status {self.proc.returncode}; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.spec.ready_path).status_code == 200:
                        return
                time.sleep(0.5)
        raise ServerError(
            f"{self.spec.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def processes(self) -> list[psutil.Process]:
        """The server and its live descendants (remembered, so stop() can reap them)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def rss_bytes(self) -> tuple[int, int]:
        """Resident memory of the server process, and of it with all its descendants."""
        root = total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                rss = int(p.memory_info().rss)
                total += rss
                if p.pid == self.proc.pid:
                    root = rss
        return root, total

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server (it shuts its engine down), then SIGKILL to what is left."""
        self.processes()
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self._seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def running(
    specs: list[ServerSpec], log_dir: Path, ready_timeout_s: float
) -> Iterator[list[Server]]:
    """Start every server at once, wait for all to be ready, and always stop them all."""
    log_dir.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for spec in specs:
            # One at a time, so the finally stops those started before a failure.
            servers.append(Server(spec, log_dir / f"{spec.name}.log"))  # noqa: PERF401
        deadline = time.monotonic() + ready_timeout_s
        for server in servers:
            server.wait_ready(max(1.0, deadline - time.monotonic()))
        yield servers
    finally:
        for server in servers:
            server.stop()


class RssSampler:
    """Peak RSS of a server (process, and process tree) while the ``with`` block runs."""

    def __init__(self, server: Server, interval_s: float = 0.1) -> None:
        self._server = server
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_process = 0
        self.peak_tree = 0

    def _run(self) -> None:
        while True:
            root, tree = self._server.rss_bytes()
            self.peak_process = max(self.peak_process, root)
            self.peak_tree = max(self.peak_tree, tree)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
