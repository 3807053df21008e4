"""The ``retort`` root imports a subcommand only when it runs."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from gateway.cli import SUBCOMMANDS

_PROBE = """
import sys
import typer
from gateway.cli import app
root = typer.main.get_command(app)
ctx = root.make_context("retort", {args!r}, resilient_parsing=True)
{resolve}
heavy = ("matplotlib", "distill", "loadtest", "adapters", "torch", "vllm", "gateway.app")
print("@@" + ",".join(sorted({{m.split(".")[0] if m.split(".")[0] != "gateway" else m
                       for m in sys.modules if m.startswith(heavy)}})))
"""


def _imported(args: list[str], resolve: str) -> set[str]:
    code = _PROBE.format(args=args, resolve=resolve)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(out.rsplit("@@", 1)[1].strip().split(",")) - {""}


def test_serve_imports_neither_the_libraries_nor_matplotlib() -> None:
    assert _imported(["serve"], "root.get_command(ctx, 'serve')") == set()


def test_help_imports_no_subcommand() -> None:
    assert _imported([], "root.get_help(ctx)") == set()


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_loads(name: str) -> None:
    import typer

    from gateway.cli import app

    root: Any = typer.main.get_command(app)
    ctx = root.make_context("retort", [name], resilient_parsing=True)
    cmd = root.get_command(ctx, name)
    assert cmd is not None
    assert cmd.name == name
