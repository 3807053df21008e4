"""Distilled students served as models: loaded from the registry, at start or on demand.

Each student runs on its own :class:`~gateway.engines.onnx.OnnxEngine` and answers to its
registry name (its folder under ``$RETORT_HOME/students``). ``students.traffic`` sends a
share of a teacher model's or adapter's requests to its student instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import msgspec

from gateway.errors import APIError, ConflictError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.engines.base import Engine
    from gateway.students import StudentRegistry

__all__ = ["StudentPool", "StudentsSettings", "TrafficSplit"]

log = logging.getLogger("retort.students")

UNLOAD_WAIT_S = 60.0


class TrafficSplit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    student: str
    """The student that takes the share."""
    share: float = 0.0
    """Fraction (0..1) of the requests for this model or adapter the student answers."""


class StudentsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    dir: str = ""
    """Registry root; ``$RETORT_HOME/students`` when empty."""
    autoload: bool = True
    """Load every registered student at start-up; otherwise each loads on its first request
    (or through ``POST /admin/students``)."""
    max_concurrency: int = 32
    """Sequences a student decodes together, one token each per step (continuous
    batching); more wait in its queue."""
    max_queue: int = 256
    """Sequences that may wait for a place; past that a request is refused at once with
    503 and ``Retry-After``."""
    traffic: dict[str, TrafficSplit] = msgspec.field(default_factory=dict)
    """Teacher model or adapter name -> the student taking a share of its traffic."""


class StudentPool:
    """The loaded students (name -> engine), over a :class:`StudentRegistry`."""

    def __init__(
        self,
        registry: StudentRegistry,
        settings: StudentsSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings or StudentsSettings()
        for source, split in self.settings.traffic.items():
            if not 0.0 <= split.share <= 1.0:
                raise ValueError(f"students.traffic[{source!r}].share must be within [0, 1]")
        self._engines: dict[str, Engine] = {}
        self._loading: dict[str, asyncio.Task[Engine]] = {}
        self._rng = rng or random.Random()
        self.live_split: Callable[[str], tuple[str, float] | None] | None = None
        """Teacher -> ``(student, share)`` of a staged rollout (``gateway.rollout``);
        ``students.traffic`` for the same teacher wins (the manual override)."""

    @property
    def root(self) -> Path:
        return self.registry.root

    def loaded(self) -> dict[str, Engine]:
        return dict(self._engines)

    def get(self, name: str) -> Engine | None:
        return self._engines.get(name)

    def registered(self, name: str) -> bool:
        """A folder of that name is in the registry, valid or not: loading it says what is
        wrong with it (a publish interrupted, a file changed) instead of "no such model"."""
        from gateway.students import StudentError, check_name

        try:
            check_name(name)
        except StudentError:
            return False
        return (self.registry.root / name).is_dir()

    async def load(self, name: str) -> Engine:
        """Load ``name`` from the registry (single-flight); a loaded one is returned as is."""
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(name))
            self._loading[name] = task
            task.add_done_callback(lambda _t: self._loading.pop(name, None))
        return await asyncio.shield(task)

    async def _load(self, name: str) -> Engine:
        from gateway.engines.onnx import OnnxEngine
        from gateway.students import StudentError

        try:
            # Every file checked against the manifest: a folder half-written or altered
            # since its publish is refused with the file's name, not loaded.
            entry = await asyncio.to_thread(self.registry.get, name, verify_hashes=True)
        except StudentError as exc:
            raise NotFoundError(str(exc), param="model", code="model_not_found") from exc
        try:
            engine = await OnnxEngine.load(
                entry.onnx_path,
                model_name=name,
                max_concurrency=self.settings.max_concurrency,
                max_queue=self.settings.max_queue,
            )
        except Exception as exc:
            log.error("student %s failed to load: %s", name, exc)
            raise APIError(
                f"The student `{name}` cannot be loaded: {exc}", code="student_load_failed"
            ) from exc
        self._engines[name] = engine
        log.info("student %s loaded from %s", name, entry.path)
        return engine

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``, let its requests in flight finish, then close it."""
        engine = self._engines.pop(name, None)
        if engine is None:
            raise NotFoundError(f"The student `{name}` is not loaded.", param="name")
        inflight = getattr(engine, "inflight", 0)
        deadline = asyncio.get_running_loop().time() + UNLOAD_WAIT_S
        while inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            inflight = getattr(engine, "inflight", 0)
        await engine.close()
        log.info("student %s unloaded", name)

    async def load_all(self) -> list[str]:
        """Load every valid registered student (those that fail are logged and skipped)."""
        names = [e.name for e in await asyncio.to_thread(self.registry.list)]
        done = []
        for name in names:
            try:
                await self.load(name)
                done.append(name)
            except Exception as exc:
                log.error("student %s failed to load: %s", name, exc)
        return done

    def split_for(self, model: str) -> Engine | None:
        """The student to answer this request for ``model`` instead, by its traffic share."""
        split = self.settings.traffic.get(model)
        if split is not None:
            student, share = split.student, split.share
        elif self.live_split is not None and (live := self.live_split(model)) is not None:
            student, share = live
        else:
            return None
        if share <= 0.0:
            return None
        engine = self._engines.get(student)
        if engine is None or not engine.ready():
            return None
        if share >= 1.0 or self._rng.random() < share:
            return engine
        return None

    def check_not_taken(self, name: str, taken: set[str]) -> None:
        if name in taken:
            raise ConflictError(f"`{name}` already names a model or adapter.", param="name")

    async def close(self) -> None:
        for name in list(self._engines):
            engine = self._engines.pop(name)
            try:
                await engine.close()
            except Exception:
                log.exception("closing student %s failed", name)
