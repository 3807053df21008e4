"""The gateway's runtime state, built once in the lifespan and injected into handlers."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from litestar.datastructures import State

from gateway.auth.keys import Authenticator
from gateway.auth.limits import RateLimiter
from gateway.pricing import Pricer

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.admission import Admission
    from gateway.metrics import Metrics
    from gateway.promptlog import PromptLog
    from gateway.rollout.service import RolloutService
    from gateway.routing import Router
    from gateway.settings import Settings
    from gateway.shadow import ShadowRunner

__all__ = ["Gateway", "provide_gateway"]


class Gateway:
    """A plain class (not a dataclass): Litestar passes it through DI without introspection."""

    def __init__(
        self,
        settings: Settings,
        router: Router | None = None,
        on_fatal: Callable[[int], None] | None = None,
        metrics: Metrics | None = None,
        *,
        auth: Authenticator | None = None,
        limiter: RateLimiter | None = None,
        pricer: Pricer | None = None,
        promptlog: PromptLog | None = None,
    ) -> None:
        self.metrics = metrics
        """Prometheus metrics (``gateway.metrics``); observed when each request ends."""
        self.settings = settings
        self.router = router
        self.auth = auth if auth is not None else Authenticator()
        """API keys (``auth:``); with none configured every request is admitted."""
        self.limiter = limiter if limiter is not None else RateLimiter()
        """Per-key limits (``limits:``), in memory or shared through Redis."""
        self.pricer = pricer if pricer is not None else Pricer()
        self.promptlog = promptlog
        self.shadow: ShadowRunner | None = None
        """Shadow evaluation of candidate students (``shadow.teachers``), once the log is open."""
        self.rollouts: RolloutService | None = None
        """Staged rollouts (``rollout:``), once the log is open."""
        """The prompt log; ``None`` until the lifespan has opened it."""
        self.admission: Admission | None = None
        """The teacher engine's bounded queue (``engine.max_queue``); ``None``: unbounded."""
        self.started_at = int(time.time())
        self.draining = False
        """Set on SIGTERM or shutdown: /ready turns 503 and new requests get 503."""
        self.fatal: str | None = None
        """Why the gateway cannot serve anymore (the engine died); /health turns 503."""
        self.on_fatal = on_fatal
        """Called once with an exit code when the engine dies (``retort serve`` stops uvicorn)."""
        self.inflight = 0
        """Requests admitted and not finished yet (streams until their last event)."""
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def routes(self) -> Router:
        """The router; 503 while the engine is still starting."""
        if self.router is None:
            from gateway.errors import ServiceUnavailableError

            raise ServiceUnavailableError("The engine is still starting.")
        return self.router

    def request_started(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests and wait for those in flight, up to ``timeout_s``.

        Returns whether every request finished in time.
        """
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True


def provide_gateway(state: State) -> Gateway:
    """The ``gateway`` dependency of the routes (and of the lean path,
    :mod:`gateway.openai.lean`); 503 while the engine is still starting."""
    gw: Gateway = state.gateway
    gw.routes  # noqa: B018 - raises 503 while the engine is still starting
    return gw
