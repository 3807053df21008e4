"""Model name -> (engine, adapter). Unknown names are an OpenAI 404 ``model_not_found``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import ModelNotFoundError

if TYPE_CHECKING:
    from gateway.engines.base import Engine

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    engine: Engine
    adapter: str | None = None
    served_by: str = "engine"


class Router:
    """Resolves the ``model`` field of a request.

    The base model answers to its served name (and, for convenience, to the model path it
    was started from); each adapter loaded in the engine answers to its own name.
    """

    def __init__(self, engine: Engine, aliases: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self._base_names = {engine.model_name, *aliases}

    @property
    def base_name(self) -> str:
        return self.engine.model_name

    def resolve(self, model: str) -> Route:
        if model in self._base_names:
            return Route(self.engine)
        if model in self.engine.adapters():
            return Route(self.engine, adapter=model)
        raise ModelNotFoundError(model)

    def model_ids(self) -> list[tuple[str, str | None]]:
        """``(id, parent)`` pairs: the base model first, then its adapters."""
        base = self.engine.model_name
        return [(base, None)] + [(a, base) for a in self.engine.adapters()]
