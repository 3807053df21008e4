"""The ``retort`` command: a thin root that imports a subcommand only when it runs.

Each subcommand is named here by ``module:attribute``, with its one-line help, so that
``retort serve`` imports the server and nothing else (no distill, no loadtest, no
matplotlib), and ``retort --help`` imports no subcommand at all. A subcommand is either a
Typer app (a group) or a function (one command).
"""

from __future__ import annotations

import importlib
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from gateway.engines.vllm_cpu import unbind_imports

__all__ = ["SUBCOMMANDS", "app", "main"]

# vLLM's engine core, spawned by `retort serve`, re-imports this module before anything else:
# there it imports torch and vLLM on every CPU, not only its OpenMP core (no-op elsewhere).
unbind_imports()

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.commands:serve", "Run the OpenAI-compatible gateway."),
    "models": ("gateway.commands:models_app", "Provision models."),
    "keys": ("gateway.commands:keys_app", "API keys (stored as sha256 hashes)."),
    "adapters": ("adapters.cli:adapters_app", "LoRA adapters: train, list, validate, ..."),
    "logs": ("retort.db.export:logs_app", "The prompt log: export for distillation."),
    "distill": ("distill.cli:distill_app", "Distill ONNX students from the prompt log."),
    "students": ("gateway.rollout.cli:students_app", "Students: staged rollouts."),
    "loadtest": ("loadtest.cli:loadtest", "Load-test an OpenAI-compatible server."),
}
"""Subcommand name -> (``module:attribute``, the help line ``retort --help`` shows)."""


def _load(name: str) -> Any:
    target, help_line = SUBCOMMANDS[name]
    module, attr = target.split(":")
    obj = getattr(importlib.import_module(module), attr)
    holder = typer.Typer()
    if isinstance(obj, typer.Typer):
        holder.add_typer(obj, name=name)
        group = typer.main.get_command(holder)
        assert isinstance(group, TyperGroup)
        return group.commands[name]
    holder.command(name, help=obj.__doc__ or help_line)(obj)
    return typer.main.get_command(holder)


class LazyGroup(TyperGroup):
    """A Typer group whose subcommands from :data:`SUBCOMMANDS` load on first use."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *SUBCOMMANDS})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in SUBCOMMANDS:
            return super().get_command(ctx, cmd_name)
        if self._listing:  # `retort --help`: the help line, without importing the command
            return TyperCommand(cmd_name, help=SUBCOMMANDS[cmd_name][1])
        if cmd_name not in self.commands:
            self.add_command(_load(cmd_name), cmd_name)
        return self.commands[cmd_name]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=LazyGroup, help="Retort: serving and distillation gateway.", no_args_is_help=True
)


@app.callback()
def _root() -> None:
    """Retort: serving and distillation gateway."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
