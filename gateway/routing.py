"""Model name -> (engine, adapter). Unknown names are an OpenAI 404 ``model_not_found``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.adapters import NO_LEASE, AdapterLease
from gateway.engines.base import AdapterEngine
from gateway.errors import ModelNotFoundError

if TYPE_CHECKING:
    from gateway.adapters import AdapterManager
    from gateway.engines.base import Engine
    from gateway.studentpool import StudentPool

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    engine: Engine
    adapter: str | None = None
    served_by: str = "engine"
    lease: AdapterLease = NO_LEASE
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
        students: StudentPool | None = None,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.students = students
        self._base_names = {engine.model_name, *aliases}
        self._base = Route(engine)
        """The base model's route (immutable: one for every request)."""

    @property
    def base_name(self) -> str:
        return self.engine.model_name

    async def resolve(self, model: str, *, split: bool = True) -> Route:
        """``split=False`` keeps the request off a traffic split to a student (requests the
        student cannot honour: constrained output, tools, logit bias)."""
        students = self.students
        if model in self._base_names:
            if split and students is not None and (student := students.split_for(model)):
                return Route(student, served_by="student")
            return self._base
        if students is not None and (student := students.get(model)) is not None:
            return Route(student, served_by="student")
        if self.adapters is not None:
            if split and students is not None and (student := students.split_for(model)):
                return Route(student, served_by="student")
            try:
                lease = await self.adapters.acquire(model)
            except ModelNotFoundError:
                if students is None or not students.registered(model):
                    raise
            else:
                return Route(self.engine, adapter=model, lease=lease)
        elif model in self._engine_adapters():
            return Route(self.engine, adapter=model)
        if students is not None and students.registered(model):
            return Route(await students.load(model), served_by="student")
        raise ModelNotFoundError(model)

    def model_ids(self) -> list[tuple[str, str | None, int]]:
        """``(id, parent, max_model_len)``: the base model, its loaded adapters, then the
        loaded students."""
        base = self.engine.model_name
        names = (
            [a.name for a in self.adapters.loaded()]
            if self.adapters is not None
            else self._engine_adapters()
        )
        max_len = self.engine.max_model_len
        out: list[tuple[str, str | None, int]] = [(base, None, max_len)]
        out += [(a, base, max_len) for a in names]
        if self.students is not None:
            out += [(n, None, e.max_model_len) for n, e in self.students.loaded().items()]
        return out

    def _engine_adapters(self) -> list[str]:
        """Adapters loaded in the engine outside a manager (none without the capability)."""
        return self.engine.adapters() if isinstance(self.engine, AdapterEngine) else []
