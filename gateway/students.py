"""The students registry: distilled ONNX students the gateway serves as models.

```
$RETORT_HOME/students/
  support-bot-student/
    student.json      the manifest (StudentManifest)
    onnx/             the onnxruntime-genai model folder (genai_config.json, model.onnx, ...)
    report.json       the distillation report; report.md, report.png beside it
```

A student's name is its folder name and the ``model`` clients send. :meth:`publish`
assembles a student in a hidden temporary folder inside the root, checks it, then renames
it into place (replacing an older version the same way), so a reader never sees half a
student. Folders starting with ``.`` are private and never listed.

Usage (the gateway)::

    registry = StudentRegistry(settings.home_path / "students")
    for entry in registry.list():           # valid students only
        engine = OnnxEngine(entry.onnx_path, model_name=entry.name)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from filelock import FileLock

from retort.files import is_valid_name, sha256_file

__all__ = [
    "MANIFEST_FILE",
    "StudentEntry",
    "StudentError",
    "StudentManifest",
    "StudentNotFoundError",
    "StudentRegistry",
]

MANIFEST_FILE = "student.json"
ONNX_DIR = "onnx"
_REPORT_FILES = ("report.json", "report.md", "report.png")


class StudentError(ValueError):
    """A student is invalid, or its name is."""


class StudentNotFoundError(StudentError, LookupError):
    """No valid student of that name."""


class StudentManifest(msgspec.Struct, kw_only=True):
    """``student.json``: what a student is and where it came from."""

    name: str
    """Registry name: the model id the gateway serves it under."""
    teacher_model: str
    """The teacher's served base model name."""
    adapter: str | None = None
    """The teacher's LoRA adapter (``None``: the base model itself)."""
    precision: str = "int4"
    """ONNX weight precision: ``fp32``, ``int8`` or ``int4``."""
    onnx_path: str = ONNX_DIR
    """The onnxruntime-genai folder, relative to the student folder."""
    created: float = 0.0
    """Unix time of publication."""
    report: dict[str, Any] = msgspec.field(default_factory=dict)
    """Summary of the distillation report (params, agreement, tok/s, gate)."""
    sha256: dict[str, str] = msgspec.field(default_factory=dict)
    """SHA-256 of every file under ``onnx_path`` (paths relative to the student folder)."""


@dataclass(frozen=True, slots=True)
class StudentEntry:
    """A registered student."""

    name: str
    path: Path
    """The student folder."""
    manifest: StudentManifest

    @property
    def onnx_path(self) -> Path:
        """The onnxruntime-genai model folder (give it to ``OnnxEngine``)."""
        return self.path / self.manifest.onnx_path


def check_name(name: str) -> str:
    if not is_valid_name(name):
        raise StudentError(f"invalid student name {name!r}: letters, digits, '.', '_', '-'")
    return name


class StudentRegistry:
    """Students under ``root`` (default ``$RETORT_HOME/students``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def validate(self, folder: Path, *, verify_hashes: bool = False) -> StudentManifest:
        """The folder's manifest, once its files are there (and match, when asked).

        Raises:
            StudentError: no or bad manifest, name mismatch, missing or altered files.
        """
        try:
            manifest = msgspec.json.decode(
                (folder / MANIFEST_FILE).read_bytes(), type=StudentManifest
            )
        except FileNotFoundError as exc:
            raise StudentError(f"{folder}: no {MANIFEST_FILE}") from exc
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StudentError(f"{folder}: bad {MANIFEST_FILE}: {exc}") from exc
        onnx = (folder / manifest.onnx_path).resolve()
        if not onnx.is_relative_to(folder.resolve()):
            raise StudentError(f"{folder}: onnx_path escapes the student folder")
        if not (onnx / "genai_config.json").is_file():
            raise StudentError(f"{folder}: no genai_config.json in {manifest.onnx_path}")
        for rel, digest in manifest.sha256.items():
            path = folder / rel
            if not path.is_file():
                raise StudentError(f"{folder}: missing {rel}")
            if verify_hashes and sha256_file(path) != digest:
                raise StudentError(f"{folder}: {rel} does not match its sha256")
        return manifest

    def _entry(self, folder: Path, *, verify_hashes: bool = False) -> StudentEntry:
        manifest = self.validate(folder, verify_hashes=verify_hashes)
        if manifest.name != folder.name:
            raise StudentError(f"{folder}: manifest names {manifest.name!r}")
        return StudentEntry(folder.name, folder, manifest)

    def list(self) -> list[StudentEntry]:
        """Valid students, by name (invalid folders are skipped)."""
        if not self.root.is_dir():
            return []
        out: list[StudentEntry] = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            with contextlib.suppress(StudentError):
                out.append(self._entry(folder))
        return out

    def get(self, name: str, *, verify_hashes: bool = False) -> StudentEntry:
        """The student ``name``.

        Raises:
            StudentNotFoundError: no such student, or it is invalid.
        """
        check_name(name)
        folder = self.root / name
        if not folder.is_dir():
            raise StudentNotFoundError(f"no student {name!r} in {self.root}")
        try:
            return self._entry(folder, verify_hashes=verify_hashes)
        except StudentError as exc:
            raise StudentNotFoundError(f"student {name!r} is invalid: {exc}") from exc

    def publish(
        self,
        name: str,
        onnx_dir: Path,
        *,
        teacher_model: str,
        adapter: str | None = None,
        precision: str = "int4",
        report: dict[str, Any] | None = None,
        report_dir: Path | None = None,
    ) -> StudentEntry:
        """Copy ``onnx_dir`` (and ``report.*`` from ``report_dir``) in as student ``name``,
        atomically replacing any student of that name; returns the new entry."""
        check_name(name)
        onnx_dir = Path(onnx_dir)
        if not (onnx_dir / "genai_config.json").is_file():
            raise StudentError(f"{onnx_dir}: not an onnxruntime-genai folder")
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".students.lock")):
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
            try:
                shutil.copytree(onnx_dir, tmp / ONNX_DIR)
                if report_dir is not None:
                    for fname in _REPORT_FILES:
                        if (Path(report_dir) / fname).is_file():
                            shutil.copy2(Path(report_dir) / fname, tmp / fname)
                hashes = {
                    str(p.relative_to(tmp)): sha256_file(p)
                    for p in sorted((tmp / ONNX_DIR).rglob("*"))
                    if p.is_file()
                }
                manifest = StudentManifest(
                    name=name,
                    teacher_model=teacher_model,
                    adapter=adapter,
                    precision=precision,
                    created=time.time(),
                    report=report or {},
                    sha256=hashes,
                )
                (tmp / MANIFEST_FILE).write_bytes(
                    msgspec.json.format(msgspec.json.encode(manifest))
                )
                self.validate(tmp, verify_hashes=False)
                tmp.chmod(0o755)
                target = self.root / name
                old: Path | None = None
                if target.exists():
                    old = self.root / f".{name}.old-{os.getpid()}-{time.monotonic_ns()}"
                    target.rename(old)
                tmp.rename(target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return self._entry(self.root / name)

    def remove(self, name: str) -> None:
        """Delete student ``name``.

        Raises:
            StudentNotFoundError: no such student.
        """
        check_name(name)
        target = self.root / name
        if not target.is_dir():
            raise StudentNotFoundError(f"no student {name!r} in {self.root}")
        with FileLock(str(self.root / ".students.lock")):
            trash = self.root / f".{name}.rm-{os.getpid()}-{time.monotonic_ns()}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
