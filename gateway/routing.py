"""Model name -> (engine, adapter). Unknown names are an OpenAI 404 ``model_not_found``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.adapters import NO_LEASE, Lease
from gateway.errors import ModelNotFoundError

if TYPE_CHECKING:
    from gateway.adapters import AdapterManager
    from gateway.engines.base import Engine

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    engine: Engine
    adapter: str | None = None
    served_by: str = "engine"
    lease: Lease = NO_LEASE
    """Held while the request is in flight (adapters wait for it before unloading)."""


class Router:
    """Resolves the ``model`` field of a request.

    The base model answers to its served name (and to the path it was started from); an
    adapter answers to its own name and is loaded on its first request when it is in the
    registry but not loaded yet, as in vLLM and LoRAX.
    """

    def __init__(
        self,
        engine: Engine,
        aliases: tuple[str, ...] = (),
        adapters: AdapterManager | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self._base_names = {engine.model_name, *aliases}

    @property
    def base_name(self) -> str:
        return self.engine.model_name

    async def resolve(self, model: str) -> Route:
        if model in self._base_names:
            return Route(self.engine)
        if self.adapters is not None:
            lease = await self.adapters.acquire(model)
            return Route(self.engine, adapter=model, lease=lease)
        if model in self.engine.adapters():
            return Route(self.engine, adapter=model)
        raise ModelNotFoundError(model)

    def model_ids(self) -> list[tuple[str, str | None]]:
        """``(id, parent)`` pairs: the base model first, then its loaded adapters."""
        base = self.engine.model_name
        names = (
            [a.name for a in self.adapters.loaded()]
            if self.adapters is not None
            else self.engine.adapters()
        )
        return [(base, None)] + [(a, base) for a in names]
