"""The adapter registry: one folder per adapter under a root, validated before use.

```
<root>/
  support-bot/
    adapter_config.json         peft's config
    adapter_model.safetensors   the weights (safetensors only)
    retort.json                 the manifest (see adapters.manifest)
    train_log.json, loss.png    present when trained here
```

Names and paths given by clients resolve inside the root (``os.path.realpath``): ``..``,
absolute paths elsewhere and symlinks that escape are refused. Every write is atomic: an
adapter is assembled in a hidden staging folder inside the root, validated, then renamed
into place, so readers never see half an adapter. Folders starting with ``.`` are private
to the registry and never listed or resolved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from adapters.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterValidationError,
)
from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest, write_manifest
from adapters.validation import BaseModelInfo, validate_adapter
from retort.files import is_valid_name

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["AdapterEntry", "AdapterRegistry", "check_name"]

_COPIED = (CONFIG_FILE, WEIGHTS_FILE, "train_log.json", "loss.png", "README.md")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise :class:`AdapterPathError`."""
    if not is_valid_name(name):
        raise AdapterPathError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 128, not starting with '.')"
        )
    return name


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    """One registry folder and the result of validating it."""

    name: str
    """Folder name (the adapter's name)."""
    path: Path
    """Its folder."""
    manifest: Manifest | None
    """The validated manifest, or ``None`` when invalid."""
    error: str | None = None
    """Why it is invalid (``None`` when valid)."""

    @property
    def valid(self) -> bool:
        """Whether it passed validation."""
        return self.error is None


class AdapterRegistry:
    """Adapters under ``root`` for one served base model.

    Args:
        root: the registry folder (created when missing).
        base_model_name: the served base model's name.
        base_model_path: its local folder, for the target-module and shape checks
            (``None``, e.g. for a hub id or the fake engine, skips those two checks).
        max_lora_rank: the engine's largest supported rank.
    """

    def __init__(
        self,
        root: Path,
        base_model_name: str,
        base_model_path: Path | None,
        max_lora_rank: int,
    ) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = BaseModelInfo(base_model_name, base_model_path)
        self.max_lora_rank = max_lora_rank

    # ------------------------------------------------------------------ paths

    @property
    def _real_root(self) -> Path:
        return Path(os.path.realpath(self.root))

    def resolve(self, name_or_path: str) -> Path:
        """The real folder for a registry name or a path inside the root.

        A relative path is taken under the root. The result need not exist, but it must
        lie strictly inside the root after resolving every symlink.

        Raises:
            AdapterPathError: empty, ``..``, a hidden component, or outside the root.
        """
        if not name_or_path or "\x00" in name_or_path:
            raise AdapterPathError("empty adapter name or path")
        given = Path(name_or_path).expanduser()
        if ".." in given.parts:
            raise AdapterPathError(f"{name_or_path!r}: '..' is not allowed in adapter paths")
        root = self._real_root
        real = Path(os.path.realpath(given if given.is_absolute() else root / given))
        if real == root or not real.is_relative_to(root):
            raise AdapterPathError(f"{name_or_path!r} resolves outside the adapter root")
        if any(part.startswith(".") for part in real.relative_to(root).parts):
            raise AdapterPathError(f"{name_or_path!r}: hidden folders are not adapters")
        return real

    # ------------------------------------------------------------------ checks

    def validate(self, path: Path) -> Manifest:
        """Validate the adapter folder ``path`` (see :mod:`adapters.validation`).

        ``path`` is not required to be inside the root (imports validate their source);
        callers taking client input :meth:`resolve` it first.

        Raises:
            AdapterValidationError: with the reason.
        """
        return validate_adapter(Path(path), base=self.base, max_lora_rank=self.max_lora_rank)

    # ------------------------------------------------------------------ queries

    def _entry(self, name: str, folder: Path) -> AdapterEntry:
        try:
            return AdapterEntry(name, folder, self.validate(folder))
        except AdapterValidationError as exc:
            return AdapterEntry(name, folder, None, exc.reason)

    def list(self) -> list[AdapterEntry]:
        """Every adapter folder in the root, by name, each validated."""
        entries: list[AdapterEntry] = []
        for child in sorted(self.root.iterdir(), key=lambda p: p.name):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                folder = self.resolve(child.name)
            except AdapterPathError as exc:
                entries.append(AdapterEntry(child.name, child, None, exc.reason))
                continue
            entries.append(self._entry(child.name, folder))
        return entries

    def get(self, name: str) -> AdapterEntry | None:
        """The entry for ``name`` (validated), or ``None`` when no such adapter exists.

        Names that could not be registry names (paths, traversal) are simply absent.
        """
        try:
            folder = self.resolve(check_name(name))
        except AdapterPathError:
            return None
        if not folder.is_dir():
            return None
        return self._entry(name, folder)

    # ------------------------------------------------------------------ writes

    def _lock(self) -> FileLock:
        return FileLock(str(self.root / ".registry.lock"))

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A fresh hidden folder inside the root to assemble ``name`` in; removed on exit.

        Fill it, then call :meth:`install` before the block ends.
        """
        check_name(name)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".staging-{name}-"))
        tmp.chmod(0o755)  # readable by a gateway running as another user once installed
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install(
        self,
        staged: Path,
        name: str,
        *,
        source: str,
        metrics: dict[str, float] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Validate the staged folder, write its ``retort.json`` and rename it to ``name``.

        Raises:
            AdapterValidationError: the staged adapter is invalid (nothing is installed).
            AdapterExistsError: ``name`` exists and ``overwrite`` is false.
        """
        check_name(name)
        (staged / MANIFEST_FILE).unlink(missing_ok=True)
        found = validate_adapter(
            staged, base=self.base, max_lora_rank=self.max_lora_rank, name=name, source=source
        )
        manifest = Manifest(
            name=name,
            base_model=found.base_model,
            rank=found.rank,
            alpha=found.alpha,
            target_modules=found.target_modules,
            sha256=found.sha256,
            created=time.time(),
            source=source,
            metrics=metrics,
        )
        write_manifest(staged, manifest)
        self.validate(staged)
        dest = self.root / name
        with self._lock():
            if dest.exists() or dest.is_symlink():
                if not overwrite:
                    raise AdapterExistsError(
                        f"adapter {name!r} already exists (use overwrite to replace it)"
                    )
                self._discard(dest)
            os.rename(staged, dest)
        return manifest

    def import_(self, src: Path, name: str, *, overwrite: bool = False) -> Manifest:
        """Validate the peft folder ``src`` and copy it into the registry as ``name``.

        Only the adapter's own files are copied (config, weights, training log and plot,
        README). Metrics in a source ``retort.json`` are kept.

        Raises:
            AdapterValidationError: ``src`` is invalid; AdapterExistsError: see :meth:`install`.
        """
        src = Path(src).expanduser()
        check_name(name)
        found = self.validate(src)
        if (self.root / name).exists() and not overwrite:
            raise AdapterExistsError(
                f"adapter {name!r} already exists (use overwrite to replace it)"
            )
        with self.staging(name) as tmp:
            for fname in _COPIED:
                if (src / fname).is_file():
                    shutil.copyfile(src / fname, tmp / fname)
            return self.install(
                tmp,
                name,
                source=f"imported:{os.path.realpath(src)}",
                metrics=found.metrics,
                overwrite=overwrite,
            )

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` from the registry (atomically: it vanishes at once).

        The gateway must unload it first if it is loaded.

        Raises:
            AdapterNotFoundError: no such adapter; AdapterPathError: invalid name.
        """
        folder = self.root / check_name(name)
        with self._lock():
            if not (folder.exists() or folder.is_symlink()):
                raise AdapterNotFoundError(f"no adapter named {name!r} in {self.root}")
            self._discard(folder)

    def _discard(self, path: Path) -> None:
        """Rename ``path`` out of sight, then delete it (a symlink is unlinked, not followed)."""
        if path.is_symlink():
            path.unlink()
            return
        trash = Path(tempfile.mkdtemp(dir=self.root, prefix=f".trash-{path.name}-"))
        os.rename(path, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)
