"""Runtime LoRA adapters: on-demand loading, LRU eviction, pinning, in-flight tracking.

The registry (``adapters/``) validates an adapter before the engine ever sees it; this
manager decides what is loaded in the engine. Loads of one name are single-flight under a
per-name lock (concurrent first requests load it once), and a load never holds a lock
that other models' requests need. Unloading waits for that adapter's in-flight requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import BadRequestError, ConflictError, ModelNotFoundError, NotFoundError

if TYPE_CHECKING:
    from gateway.engines.base import AdapterEngine
    from gateway.metrics import Metrics

__all__ = ["AdapterLease", "AdapterManager", "LoadedAdapter"]

log = logging.getLogger("retort.adapters")


@dataclass
class LoadedAdapter:
    name: str
    path: str
    sha256: str
    loaded_at: float
    load_seconds: float
    pinned: bool = False
    last_used: float = 0.0
    requests: int = 0
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "loaded": True,
            "pinned": self.pinned,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 6),
            "last_used": self.last_used or None,
            "requests": self.requests,
            "inflight": self.inflight,
        }


class AdapterLease:
    """Marks one request in flight on an adapter until released (idempotent)."""

    __slots__ = ("_adapter", "_released")

    def __init__(self, adapter: LoadedAdapter | None) -> None:
        self._adapter = adapter
        self._released = False
        if adapter is not None:
            adapter.inflight += 1
            adapter.requests += 1
            adapter.last_used = time.time()
            adapter.idle.clear()

    def release(self) -> None:
        if self._released or self._adapter is None:
            return
        self._released = True
        a = self._adapter
        a.inflight -= 1
        a.last_used = time.time()
        if a.inflight == 0:
            a.idle.set()


NO_LEASE = AdapterLease(None)


class AdapterManager:
    def __init__(
        self,
        engine: AdapterEngine,
        registry: Any,
        *,
        max_loaded: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.max_loaded = max_loaded
        self.metrics = metrics
        self._loaded: dict[str, LoadedAdapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ queries

    def loaded(self) -> list[LoadedAdapter]:
        return list(self._loaded.values())

    def get(self, name: str) -> LoadedAdapter | None:
        return self._loaded.get(name)

    def available(self) -> list[dict[str, Any]]:
        """Every registry adapter, loaded or not, for ``GET /admin/adapters``."""
        out: list[dict[str, Any]] = []
        seen = set()
        for entry in self.registry.list():
            name = entry.name
            seen.add(name)
            loaded = self._loaded.get(name)
            if loaded is not None:
                out.append(loaded.to_json())
            else:
                out.append(
                    {
                        "name": name,
                        "path": str(entry.path),
                        "loaded": False,
                        "pinned": False,
                        "valid": entry.error is None,
                        "error": entry.error,
                    }
                )
        out.extend(a.to_json() for n, a in self._loaded.items() if n not in seen)
        return out

    # ------------------------------------------------------------------ loading

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _validate(self, path: Path) -> Any:
        from adapters.errors import AdapterValidationError

        try:
            return await asyncio.to_thread(self.registry.validate, path)
        except AdapterValidationError as exc:
            raise BadRequestError(f"Invalid adapter: {exc}", param="lora_path") from exc

    def _resolve(self, name: str, path: str | None) -> Path:
        from adapters.errors import AdapterValidationError

        try:
            return Path(self.registry.resolve(path or name))
        except AdapterValidationError as exc:
            raise BadRequestError(f"Invalid adapter path: {exc}", param="lora_path") from exc

    async def load(
        self, name: str, path: str | None = None, *, pinned: bool = False
    ) -> LoadedAdapter:
        """Validate then load ``name`` (from ``path`` or its registry folder).

        Loading the same weights again is a no-op; other weights under a loaded name is 409.
        """
        if not name or "/" in name or name == self.engine.model_name:
            raise BadRequestError(f"Invalid adapter name {name!r}.", param="lora_name")
        folder = self._resolve(name, path)
        if not folder.exists() and path is None:
            raise ModelNotFoundError(name)
        manifest = await self._validate(folder)
        async with self._lock(name):
            current = self._loaded.get(name)
            if current is not None:
                if current.sha256 != manifest.sha256:
                    raise ConflictError(
                        f"Adapter `{name}` is already loaded with different weights; "
                        "unload it first.",
                        param="lora_name",
                    )
                current.pinned = current.pinned or pinned
                return current
            await self._make_room()
            t0 = time.perf_counter()
            await self.engine.load_adapter(name, str(folder))
            dt = time.perf_counter() - t0
            adapter = LoadedAdapter(
                name=name,
                path=str(folder),
                sha256=manifest.sha256,
                loaded_at=time.time(),
                load_seconds=dt,
                pinned=pinned,
            )
            adapter.idle.set()
            self._loaded[name] = adapter
            log.info("adapter %s loaded in %.1f ms", name, dt * 1000)
            if self.metrics is not None:
                self.metrics.observe_adapter_load(name, dt)
                self.metrics.set_adapters_loaded(len(self._loaded))
            return adapter

    async def ensure_loaded(self, name: str) -> LoadedAdapter:
        """On-demand: load a registry adapter on its first request (single-flight)."""
        adapter = self._loaded.get(name)
        if adapter is not None:
            return adapter
        try:
            entry = self.registry.get(name)
        except Exception:
            entry = None
        if entry is None:
            raise ModelNotFoundError(name)
        return await self.load(name)

    async def _make_room(self) -> None:
        while len(self._loaded) >= self.max_loaded:
            victims = [a for a in self._loaded.values() if not a.pinned]
            if not victims:
                raise ConflictError(
                    f"All {len(self._loaded)} loaded adapters are pinned; "
                    "unpin one or raise adapters.max_loaded."
                )
            victim = min(victims, key=lambda a: (a.inflight > 0, a.last_used or a.loaded_at))
            log.info("evicting adapter %s (least recently used)", victim.name)
            await self.unload(victim.name, evicting=True)

    async def unload(self, name: str, *, evicting: bool = False) -> None:
        """Unload after the adapter's in-flight requests finish. Pinned: 409; unknown: 404."""
        adapter = self._loaded.get(name)
        if adapter is None:
            raise NotFoundError(f"Adapter `{name}` is not loaded.", param="lora_name")
        if adapter.pinned and not evicting:
            raise ConflictError(f"Adapter `{name}` is pinned; unpin it first.", param="lora_name")
        async with self._lock(name):
            # New requests stop resolving it at once (they wait on the lock and load it
            # again if asked); the in-flight ones finish first.
            if self._loaded.get(name) is not adapter:
                return
            self._loaded.pop(name)
            await adapter.idle.wait()
            await self.engine.unload_adapter(name)
        log.info("adapter %s unloaded", name)
        if self.metrics is not None:
            self.metrics.set_adapters_loaded(len(self._loaded))

    def pin(self, name: str, pinned: bool = True) -> LoadedAdapter:
        adapter = self._loaded.get(name)
        if adapter is None:
            raise NotFoundError(f"Adapter `{name}` is not loaded.", param="name")
        adapter.pinned = pinned
        return adapter

    async def acquire(self, name: str) -> AdapterLease:
        """Resolve (loading on demand) and mark one request in flight."""
        adapter = await self.ensure_loaded(name)
        return AdapterLease(adapter)
