"""``create_app(settings) -> Litestar``: the lifespan builds the engine; routes are injected.

The engine starts in the background, so ``/health`` answers at once and ``/ready`` turns
200 only when the engine can serve. A watchdog notices a dead engine: ``/health`` and
``/ready`` turn 503, in-flight requests fail with a clear error, and ``on_fatal`` is
called so that ``retort serve`` exits non-zero and the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from litestar import Litestar, MediaType, Response, get
from litestar import Router as RouteGroup
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from prometheus_client import CollectorRegistry

from gateway.adapters import AdapterManager
from gateway.admin import ADMIN_HANDLERS, LORA_HANDLERS
from gateway.admission import Admission
from gateway.auth.keys import Authenticator
from gateway.auth.limits import build_rate_limiter
from gateway.console import console_lifespan, console_router, template_config
from gateway.engines.base import AdapterEngine, BoundedEngine, Engine
from gateway.errors import exception_handler
from gateway.feedback import feedback
from gateway.guards import admin_guard, api_auth, check_api_key
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics, ReportsStats
from gateway.openai.chat import chat_completions
from gateway.openai.completions import completions
from gateway.openai.lean import LeanApp
from gateway.openai.models import list_models, retrieve_model
from gateway.openai.responses import RESPONSE_HANDLERS
from gateway.pricing import Pricer
from gateway.promptlog import PromptLog
from gateway.requestid import add_request_id_header
from gateway.rollout.service import RolloutService
from gateway.routing import Router
from gateway.shadow import ShadowRunner
from gateway.state import Gateway, provide_gateway
from gateway.studentpool import StudentPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from gateway.settings import Settings
    from retort.db.store import PromptStore

__all__ = ["build_engine", "create_app"]

log = logging.getLogger("retort.app")

WATCHDOG_INTERVAL_S = 0.5
START_PROGRESS_INTERVAL_S = 10.0
PROMPTLOG_OPEN_WAIT_S = 10.0
"""How long start-up waits for the prompt log's store before serving without it (for now)."""


def build_engine(settings: Settings) -> Engine:
    """Build the engine the settings ask for (blocking: provisions and loads the model)."""
    eng = settings.engine
    if eng.kind == "fake":
        from gateway.engines.fake import FakeEngine

        return FakeEngine(
            model_name=settings.model.served_name or "fake-model",
            max_model_len=eng.max_model_len or 2048,
            token_delay_s=eng.fake_token_delay_s,
            max_num_seqs=eng.max_num_seqs,
        )
    from gateway.engines.vllm import VLLMEngine
    from retort.models import resolve_model

    model = resolve_model(settings.model.path, settings.home_path)
    return VLLMEngine.start(eng, model, served_model_name(settings))


def build_adapter_manager(settings: Settings, engine: Engine) -> AdapterManager:
    """The registry over ``adapters.dir`` and the runtime manager over ``engine``."""
    from adapters.registry import AdapterRegistry

    if not isinstance(engine, AdapterEngine):
        raise TypeError(f"engine.enable_lora: the {type(engine).__name__} takes no adapters")

    base_path = None
    if settings.engine.kind != "fake":
        from retort.models import resolve_model

        candidate = Path(resolve_model(settings.model.path, settings.home_path))
        base_path = candidate if candidate.is_dir() else None
    root = settings.adapters_path
    root.mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(
        root,
        base_model_name=engine.model_name,
        base_model_path=base_path,
        max_lora_rank=settings.engine.max_lora_rank,
    )
    return AdapterManager(engine, registry, max_loaded=settings.adapters.max_loaded)


def build_admission(settings: Settings, engine: Engine, metrics: Metrics) -> Admission | None:
    """The teacher engine's bounded queue (``engine.max_queue``, ``max_queue_wait_s``) over
    its capacity (``max_num_seqs``); ``None`` for an engine without a bound."""
    capacity = engine.max_num_seqs if isinstance(engine, BoundedEngine) else None
    grouping = settings.engine.adapter_group_max
    if capacity is None:
        if not grouping:
            return None
        capacity = 1 << 30  # no engine bound: admission only groups adapters
    admission = Admission(
        capacity,
        max_queue=settings.engine.max_queue,
        max_wait_s=settings.engine.max_queue_wait_s,
        on_reject=metrics.admission_rejected,
        group_adapters=grouping,
        group_wait_s=settings.engine.adapter_group_wait_s,
    )
    metrics.watch_admission(lambda: admission.waiting)
    return admission


def build_student_pool(settings: Settings) -> StudentPool:
    """The students under ``students.dir`` (``$RETORT_HOME/students``)."""
    from gateway.students import StudentRegistry

    return StudentPool(StudentRegistry(settings.students_path), settings.students)


def served_model_name(settings: Settings) -> str:
    if settings.model.served_name:
        return settings.model.served_name
    if settings.model.path == "default":
        from retort.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return settings.model.path.rstrip("/").rsplit("/", 1)[-1]


@get("/health", summary="Liveness", include_in_schema=True)
async def health(state: State) -> Response[dict[str, str]]:
    gw: Gateway = state.gateway
    if gw.fatal:
        return Response({"status": "dead", "reason": gw.fatal}, status_code=503)
    return Response({"status": "ok"}, media_type=MediaType.JSON)


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(state: State) -> Response[bytes]:
    gw: Gateway = state.gateway
    body = gw.metrics.render() if gw.metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@get("/ready", summary="Readiness")
async def ready(state: State) -> Response[dict[str, str]]:
    gw: Gateway = state.gateway
    if gw.fatal:
        return Response({"status": "dead", "reason": gw.fatal}, status_code=503)
    if gw.draining:
        return Response({"status": "draining"}, status_code=503)
    if gw.router is None or not gw.router.engine.ready():
        return Response({"status": "starting"}, status_code=503)
    return Response({"status": "ready"})


async def _open_promptlog(
    gw: Gateway, settings: Settings, metrics: Metrics, students: StudentPool
) -> None:
    """Start the prompt log, then open its store; while its database is unreachable,
    retry. Records are accepted from the first request: until the database first answers
    they wait in the writer's bounded queue (or the disk spool), as in an outage after
    start. Feedback, stored responses and the console answer 503 until then. Shadow
    evaluation, which stores its pairs beside the log, starts once the store is open."""
    delay = 1.0
    plog: PromptLog | None = None
    while True:
        try:
            if plog is None:
                plog = PromptLog.start(settings.promptlog, settings.home_path, metrics)
                gw.promptlog = plog
            await plog.connect()
            rollouts = settings.rollout.enabled and plog.store is not None
            if (settings.shadow.teachers or rollouts) and plog.store is not None:
                gw.shadow = ShadowRunner(
                    settings.shadow,
                    students,
                    plog.store,
                    metrics=metrics,
                    pricer=gw.pricer,
                    redact=plog.redactor.redact if plog.redactor is not None else None,
                )
            if rollouts and plog.store is not None:
                await _start_rollouts(gw, settings, metrics, students, plog.store)
            return
        except Exception as exc:
            log.error("prompt log: cannot open the store (retrying in %.0fs): %s", delay, exc)
            if plog is None:
                await asyncio.sleep(delay)
            else:
                await plog.wait_connected(delay)  # the writer may reach the database first
            delay = min(delay * 2, 30.0)


async def _start_rollouts(
    gw: Gateway, settings: Settings, metrics: Metrics, students: StudentPool, store: PromptStore
) -> None:
    """Staged rollouts: the state as stored (a restart resumes where it stood), the split
    and shadow copies it asks for, and the evaluator in the background."""
    from retort.db.rollouts import RolloutStore

    service = RolloutService(
        settings.rollout, RolloutStore(store.engine), students=students, metrics=metrics
    )
    try:
        await service.refresh()
    except Exception as exc:
        log.error("rollout: cannot read the rollout state yet: %s", exc)
    students.live_split = service.split
    if gw.shadow is not None:
        gw.shadow.dynamic = service.shadow_target
    gw.rollouts = service
    service.start()


@dataclass
class _Started:
    """What the lifespan started (and so must stop), as it comes up."""

    engine: Engine | None = None
    students: StudentPool | None = None


async def _start_progress(t0: float) -> None:
    """While the engine starts, say so now and then (a first start compiles the model)."""
    while True:
        await asyncio.sleep(START_PROGRESS_INTERVAL_S)
        log.info(
            "engine starting: %.0f s so far (a first start on a machine takes longest, "
            "see README: Start-up time)",
            time.perf_counter() - t0,
        )


async def _watchdog(gw: Gateway, engine: Engine) -> None:
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        if engine.dead() and not gw.draining:
            gw.fatal = "the engine process died"
            log.critical("engine died: marking the gateway dead and exiting")
            if gw.on_fatal is not None:
                gw.on_fatal(1)
            return


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    on_fatal: Callable[[int], None] | None = None,
) -> Litestar:
    """The Litestar app. ``engine`` injects a ready engine (tests); otherwise it is built."""

    # A registry per app: several apps (tests) never collide; /metrics renders this one.
    app_metrics = Metrics(CollectorRegistry(), key_label=settings.metrics.key_label)
    # Bad keys or limits are configuration errors: fail here, before serving anything.
    auth = Authenticator(settings.auth)
    pricer = Pricer(settings.pricing)
    students = build_student_pool(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        limiter = build_rate_limiter(settings.limits, auth, app_metrics)
        gw = Gateway(
            settings=settings,
            router=None,
            on_fatal=on_fatal,
            metrics=app_metrics,
            auth=auth,
            limiter=limiter,
            pricer=pricer,
        )
        app.state.gateway = gw
        tasks: list[asyncio.Task[None]] = []
        started = _Started()
        if settings.promptlog.enabled:
            tasks.append(asyncio.create_task(_open_promptlog(gw, settings, app_metrics, students)))
            await asyncio.wait([tasks[-1]], timeout=PROMPTLOG_OPEN_WAIT_S)

        async def boot() -> None:
            t0 = time.perf_counter()
            if engine is not None:
                eng = engine
            else:
                progress = asyncio.create_task(_start_progress(t0))
                try:
                    eng = await asyncio.to_thread(build_engine, settings)
                finally:
                    progress.cancel()
            started.engine = eng
            if isinstance(eng, ReportsStats):
                app_metrics.engine_stats = eng.stats
            manager = None
            if settings.engine.enable_lora:
                manager = await asyncio.to_thread(build_adapter_manager, settings, eng)
                manager.metrics = app_metrics
                for name in settings.adapters.pinned:
                    await manager.load(name, pinned=True)
                for name in settings.adapters.preload:
                    await manager.load(name)
            started.students = students
            if settings.students.autoload:
                loaded = await students.load_all()
                if loaded:
                    log.info("students loaded: %s", ", ".join(loaded))
            students.watch()
            gw.admission = build_admission(settings, eng, app_metrics)
            gw.router = Router(
                eng, aliases=(settings.model.path,), adapters=manager, students=students
            )
            took = time.perf_counter() - t0
            app_metrics.set_engine_start(took)
            log.info("engine ready: serving %s (started in %.1f s)", eng.model_name, took)
            tasks.append(asyncio.create_task(_watchdog(gw, eng)))

        async def boot_or_die() -> None:
            try:
                await boot()
            except Exception as exc:
                log.critical("engine failed to start: %s", exc, exc_info=exc)
                gw.fatal = f"the engine failed to start: {exc}"
                if on_fatal is not None:
                    on_fatal(1)

        if engine is not None:
            await boot()
        else:
            tasks.append(asyncio.create_task(boot_or_die()))
        try:
            yield
        finally:
            # Requests still in flight (uvicorn has waited for its connections) finish
            # first; then the log is flushed, and only then does the engine go.
            finished = await gw.drain(settings.shutdown.drain_seconds)
            if not finished:
                log.warning("shutdown: %d requests still in flight after the drain", gw.inflight)
            for t in tasks:
                t.cancel()
            if gw.rollouts is not None:
                await gw.rollouts.close()
            if gw.shadow is not None:
                await gw.shadow.drain(wait_s=10.0)
            if gw.promptlog is not None:
                try:
                    await gw.promptlog.close()
                except Exception:
                    log.exception("shutdown: closing the prompt log failed")
            with contextlib.suppress(Exception):
                await limiter.close()
            if started.students is not None:
                with contextlib.suppress(Exception):
                    await started.students.close()
            if started.engine is not None and engine is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(started.engine.close(), timeout=30)

    return LeanApp(
        lean_checks={api_auth: check_api_key},
        route_handlers=[
            # Access rules sit on the groups, never on single handlers.
            RouteGroup(
                "/v1",
                middleware=[api_auth],
                route_handlers=[
                    chat_completions,
                    completions,
                    *RESPONSE_HANDLERS,
                    list_models,
                    retrieve_model,
                    feedback,
                ],
            ),
            # vLLM's adapter endpoints live under /v1 but are administration.
            RouteGroup("/v1", guards=[admin_guard], route_handlers=LORA_HANDLERS),
            RouteGroup("/admin", guards=[admin_guard], route_handlers=ADMIN_HANDLERS),
            health,
            ready,
            metrics,
            console_router(),
        ],
        dependencies={"gateway": Provide(provide_gateway, sync_to_thread=False)},
        exception_handlers={Exception: exception_handler},
        before_send=[add_request_id_header],
        lifespan=[lifespan, console_lifespan],
        template_config=template_config(),
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Retort", version="0.1.0", path="/schema"),
        debug=False,
    )
