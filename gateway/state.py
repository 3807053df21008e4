"""The gateway's runtime state, built once in the lifespan and injected into handlers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.metrics import Metrics
    from gateway.routing import Router
    from gateway.settings import Settings

__all__ = ["Gateway"]


class Gateway:
    """A plain class (not a dataclass): Litestar passes it through DI without introspection."""

    def __init__(
        self,
        settings: Settings,
        router: Router | None = None,
        on_fatal: Callable[[int], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        """Prometheus metrics (``gateway.metrics``); observed when each request ends."""
        self.settings = settings
        self.router = router
        self.started_at = int(time.time())
        self.draining = False
        """Set on shutdown: /ready turns 503 and new requests get 503."""
        self.fatal: str | None = None
        """Why the gateway cannot serve anymore (the engine died); /health turns 503."""
        self.on_fatal = on_fatal
        """Called once with an exit code when the engine dies (``retort serve`` stops uvicorn)."""

    @property
    def routes(self) -> Router:
        """The router; 503 while the engine is still starting."""
        if self.router is None:
            from gateway.errors import ServiceUnavailableError

            raise ServiceUnavailableError("The engine is still starting.")
        return self.router
