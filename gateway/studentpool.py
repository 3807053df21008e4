"""Distilled students served as models: loaded from the registry, at start or on demand.

Each student runs on its own :class:`~gateway.engines.onnx.OnnxEngine` and answers to its
registry name (its folder under ``$RETORT_HOME/students``). ``students.traffic`` sends a
share of a teacher model's or adapter's requests to its student instead.

A loaded student republished under the same name (the scheduled ``retort distill run
--publish`` does exactly that) is noticed within ``students.reload_interval_s``: the new files
are loaded beside the old engine, requests switch to the new one at once, and the old one
closes once its requests in flight are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from typing import TYPE_CHECKING

import msgspec

from gateway.errors import APIError, ConflictError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.engines.base import Engine
    from gateway.students import StudentManifest, StudentRegistry

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
    batch_invariant: bool = True
    """Decode a lone sequence as two rows, so a student's tokens never depend on how many
    requests share its steps (greedy answers are the same alone or under load, and match the
    gate's evaluation); costs ~30% of single-stream speed, nothing with two streams or more.
    ``false``: the fastest single stream."""
    reload_interval_s: float = 5.0
    """How often loaded students are checked against the registry: one republished under
    its name is reloaded from its new files without a restart (0: never)."""


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
        self._versions: dict[str, tuple[float, str]] = {}
        """Loaded name -> its publication (``created``, and the manifest's file hashes)."""
        self._watch: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
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
        engine, version = await self._open(name)
        self._engines[name] = engine
        self._versions[name] = version
        return engine

    async def _open(self, name: str) -> tuple[Engine, tuple[float, str]]:
        """A new engine on ``name``'s files as they are now, and its publication."""
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
                batch_invariant=self.settings.batch_invariant,
            )
        except Exception as exc:
            log.error("student %s failed to load: %s", name, exc)
            raise APIError(
                f"The student `{name}` cannot be loaded: {exc}", code="student_load_failed"
            ) from exc
        log.info("student %s loaded from %s", name, entry.path)
        return engine, _version(entry.manifest)

    async def refresh(self) -> list[str]:
        """Reload every loaded student republished since it was loaded; returns their names.
        One whose new files do not load keeps serving its old engine (and is tried again
        next time); one removed from the registry keeps serving until it is unloaded."""
        from gateway.students import StudentError

        reloaded = []
        for name, version in list(self._versions.items()):
            try:
                entry = await asyncio.to_thread(self.registry.get, name)
            except StudentError:
                continue  # removed, or being republished right now
            if _version(entry.manifest) == version or name in self._loading:
                continue
            try:
                engine, new = await self._open(name)
            except APIError as exc:
                log.error("student %s was republished but cannot be reloaded: %s", name, exc)
                continue
            old = self._engines.get(name)
            if self._versions.get(name) != version or old is None:  # unloaded meanwhile
                await engine.close()
                continue
            self._engines[name] = engine
            self._versions[name] = new
            log.info("student %s republished: serving its new files", name)
            reloaded.append(name)
            task = asyncio.create_task(self._retire(name, old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return reloaded

    def watch(self, interval_s: float | None = None) -> None:
        """Check for republished students every ``interval_s`` (``reload_interval_s``)."""
        every = self.settings.reload_interval_s if interval_s is None else interval_s
        if every <= 0 or self._watch is not None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.refresh()
                except Exception:
                    log.exception("checking the students for republished ones failed")

        self._watch = asyncio.create_task(loop(), name="students-reload")

    async def _retire(self, name: str, engine: Engine) -> None:
        """Close an engine no longer routed to, once its requests in flight are done."""
        await _drained(engine)
        try:
            await engine.close()
        except Exception:
            log.exception("closing the replaced student %s failed", name)

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``, let its requests in flight finish, then close it."""
        engine = self._engines.pop(name, None)
        self._versions.pop(name, None)
        if engine is None:
            raise NotFoundError(f"The student `{name}` is not loaded.", param="name")
        await _drained(engine)
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
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task
        self._versions.clear()
        for name in list(self._engines):
            engine = self._engines.pop(name)
            try:
                await engine.close()
            except Exception:
                log.exception("closing student %s failed", name)


def _version(manifest: StudentManifest) -> tuple[float, str]:
    """What identifies one publication of a student: its time and its files' hashes."""
    files = "\n".join(f"{k} {v}" for k, v in sorted(manifest.sha256.items()))
    return manifest.created, hashlib.sha256(files.encode()).hexdigest()


async def _drained(engine: Engine) -> None:
    """Wait (at most ``UNLOAD_WAIT_S``) until no request is in flight on ``engine``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + UNLOAD_WAIT_S
    inflight = getattr(engine, "inflight", 0)
    while inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
        inflight = getattr(engine, "inflight", 0)
