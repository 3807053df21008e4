"""``retort adapters``: train, list, validate, import and remove LoRA adapters.

The registry root is ``--root``, else ``adapters.dir`` from the settings (``--config`` and
``RETORT_*``; default ``$RETORT_HOME/adapters``). Validation runs against the configured
base model (``model.path``; ``default`` is provisioned on first use) and
``engine.max_lora_rank``, exactly as the gateway checks before loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer

from adapters.errors import AdapterError
from adapters.registry import AdapterRegistry

if TYPE_CHECKING:
    from retort.settings import SharedSettings

__all__ = ["adapters_app"]

adapters_app = typer.Typer(
    help="LoRA adapters: train, list, validate, import, remove.", no_args_is_help=True
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (retort.yaml).")
]
RootOpt = Annotated[
    Path | None, typer.Option("--root", help="Registry root (default: adapters.dir).")
]
BaseOpt = Annotated[
    Path | None,
    typer.Option("--base-model", help="Base model folder (default: the configured model)."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None) -> SharedSettings:
    from retort.settings import SettingsError, load_shared

    try:
        return load_shared(config)
    except SettingsError as exc:
        raise _fail(str(exc), 2) from exc


def _base(settings: SharedSettings, base_model: Path | None) -> tuple[str, Path | None]:
    """(served name, local folder or None) of the base model the adapters are for."""
    if base_model is not None:
        folder = base_model.expanduser()
        if not folder.is_dir():
            raise _fail(f"base model folder {folder} does not exist")
        return settings.model.served_name or folder.name, folder
    from retort.models import DEFAULT_MODEL_NAME, ModelError, resolve_model

    try:
        resolved = resolve_model(settings.model.path, settings.home_path)
    except ModelError as exc:
        raise _fail(str(exc)) from exc
    if settings.model.served_name:
        name = settings.model.served_name
    elif settings.model.path == "default":
        name = DEFAULT_MODEL_NAME
    else:
        name = settings.model.path.rstrip("/").rsplit("/", 1)[-1]
    folder = Path(resolved).expanduser()
    return name, folder if folder.is_dir() else None


def _registry(
    config: Path | None, root: Path | None, base_model: Path | None = None
) -> AdapterRegistry:
    settings = _settings(config)
    name, folder = _base(settings, base_model)
    return AdapterRegistry(
        root.expanduser() if root else settings.adapters_path,
        base_model_name=name,
        base_model_path=folder,
        max_lora_rank=settings.engine.max_lora_rank,
    )


@adapters_app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Chat JSONL ({'messages': [...]}).")],
    name: Annotated[str, typer.Option("--name", help="Adapter name in the registry.")],
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    targets: Annotated[str, typer.Option(help="Comma-separated modules.")] = "q_proj,v_proj",
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Steps (overrides epochs).")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Conversations per step.")] = 8,
    max_len: Annotated[int, typer.Option(help="Tokens per conversation.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    base_model: BaseOpt = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """LoRA SFT on the base model (assistant tokens only); writes a registry-ready adapter."""
    from adapters.train import TrainConfig, train_result

    registry = _registry(config, root, base_model)
    if registry.base.path is None:
        raise _fail("training needs a local base model folder (--base-model)")
    cfg = TrainConfig(
        data=data,
        name=name,
        base_model=registry.base.path,
        out_root=registry.root,
        rank=rank,
        alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        max_len=max_len,
        seed=seed,
        overwrite=overwrite,
    )
    try:
        result = train_result(cfg, progress=not quiet)
    except AdapterError as exc:
        raise _fail(exc.reason) from exc
    steps = len(result.losses)
    typer.echo(
        f"trained {name}: {steps} steps in {result.seconds:.1f}s "
        f"({result.seconds / steps:.2f} s/step), loss {result.losses[0]:.3f} -> "
        f"{result.losses[-1]:.3f}"
    )
    typer.echo(str(result.path))


@adapters_app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Every adapter in the registry, validated."""
    registry = _registry(config, root)
    entries = registry.list()
    if as_json:
        rows = [
            {
                "name": e.name,
                "path": str(e.path),
                "valid": e.valid,
                "error": e.error,
                "manifest": msgspec.to_builtins(e.manifest) if e.manifest else None,
            }
            for e in entries
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adapters in {registry.root}")
    for col in ("name", "rank", "alpha", "targets", "base", "source", "sha256", "status"):
        table.add_column(col)
    for e in entries:
        m = e.manifest
        if m is None:
            table.add_row(e.name, "", "", "", "", "", "", f"[red]invalid: {e.error}[/red]")
        else:
            table.add_row(
                e.name, str(m.rank), f"{m.alpha:g}", ",".join(m.target_modules),
                m.base_model, m.source, m.sha256[:12], "[green]ok[/green]",
            )  # fmt: skip
    Console().print(table)


@adapters_app.command("validate")
def validate_cmd(
    name_or_path: Annotated[str, typer.Argument(help="Registry name, or an adapter folder.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run every check the gateway runs before loading; exit 1 with the reason if any fails."""
    from adapters.errors import AdapterPathError

    registry = _registry(config, root)
    try:
        try:
            folder = registry.resolve(name_or_path)
        except AdapterPathError:
            folder = Path(name_or_path).expanduser()
            if not folder.is_dir():
                raise
        manifest = registry.validate(folder)
    except AdapterError as exc:
        raise _fail(f"{name_or_path}: {exc.reason}") from exc
    typer.echo(msgspec.json.format(msgspec.json.encode(manifest)).decode())
    typer.echo(f"ok: {folder}")


@adapters_app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="A peft adapter folder (safetensors).")],
    name: Annotated[str, typer.Option("--name", help="Name in the registry.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter.")] = False,
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Validate a peft adapter folder and copy it into the registry."""
    registry = _registry(config, root)
    try:
        manifest = registry.import_(path, name, overwrite=overwrite)
    except AdapterError as exc:
        raise _fail(exc.reason) from exc
    typer.echo(f"imported {manifest.name} (sha256 {manifest.sha256[:12]}) into {registry.root}")


@adapters_app.command("remove")
def remove_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Delete an adapter from the registry (unload it from running gateways first)."""
    registry = _registry(config, root)
    try:
        registry.remove(name)
    except AdapterError as exc:
        raise _fail(exc.reason) from exc
    typer.echo(f"removed {name}")
