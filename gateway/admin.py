"""Administration: ``/admin/adapters[...]``, ``/admin/students[...]`` (:data:`ADMIN_HANDLERS`;
rollouts in :mod:`gateway.rollout.admin`,
paths relative to ``/admin``) and vLLM's ``/v1/(un)load_lora_adapter`` (:data:`LORA_HANDLERS`,
relative to ``/v1``). ``create_app`` mounts both under :func:`gateway.guards.admin_guard`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post

from gateway.adapters import AdapterManager
from gateway.errors import NotFoundError, ServiceUnavailableError
from gateway.rollout.admin import ROLLOUT_HANDLERS
from gateway.state import Gateway
from gateway.studentpool import StudentPool

__all__ = ["ADMIN_HANDLERS", "LORA_HANDLERS"]


class LoadAdapter(msgspec.Struct, kw_only=True):
    name: str
    path: str | None = None
    pinned: bool = False


class PinAdapter(msgspec.Struct, kw_only=True):
    pinned: bool = True


class LoadLoraRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``LoadLoRAAdapterRequest``."""

    lora_name: str
    lora_path: str | None = None


class UnloadLoraRequest(msgspec.Struct, kw_only=True):
    lora_name: str
    lora_int_id: int | None = None


def _manager(gw: Gateway) -> AdapterManager:
    adapters = gw.routes.adapters
    if adapters is None:
        raise ServiceUnavailableError(
            "LoRA is not enabled: set engine.enable_lora: true.", code="lora_disabled"
        )
    return adapters


def _json(obj: Any, status: int = 200) -> Response[bytes]:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


@get("/adapters", summary="List loaded and available adapters")
async def list_adapters(gateway: Gateway) -> Response[bytes]:
    return _json({"object": "list", "data": _manager(gateway).available()})


@post("/adapters", status_code=200, summary="Load an adapter")
async def load_adapter(data: LoadAdapter, gateway: Gateway) -> Response[bytes]:
    adapter = await _manager(gateway).load(data.name, data.path, pinned=data.pinned)
    return _json(adapter.to_json())


@delete(
    "/adapters/{name:str}",
    status_code=200,
    summary="Unload an adapter (in-flight requests finish first)",
)
async def unload_adapter(name: str, gateway: Gateway) -> Response[bytes]:
    await _manager(gateway).unload(name)
    return _json({"name": name, "loaded": False})


@post(
    "/adapters/{name:str}/pin",
    status_code=200,
    summary="Pin (or unpin) a loaded adapter",
)
async def pin_adapter(
    name: str, request: Request[Any, Any, Any], gateway: Gateway
) -> Response[bytes]:
    body = await request.body()
    pinned = msgspec.json.decode(body, type=PinAdapter).pinned if body.strip() else True
    return _json(_manager(gateway).pin(name, pinned).to_json())


@post(
    "/load_lora_adapter",
    status_code=200,
    summary="vLLM-compatible adapter load",
)
async def vllm_load(data: LoadLoraRequest, gateway: Gateway) -> Response[str]:
    await _manager(gateway).load(data.lora_name, data.lora_path)
    return Response(
        f"Success: LoRA adapter '{data.lora_name}' added successfully.", media_type="text/plain"
    )


@post(
    "/unload_lora_adapter",
    status_code=200,
    summary="vLLM-compatible adapter unload",
)
async def vllm_unload(data: UnloadLoraRequest, gateway: Gateway) -> Response[str]:
    manager = _manager(gateway)
    if manager.get(data.lora_name) is None:
        raise NotFoundError(
            f"The lora adapter '{data.lora_name}' cannot be found.", param="lora_name"
        )
    await manager.unload(data.lora_name)
    return Response(
        f"Success: LoRA adapter '{data.lora_name}' removed successfully.", media_type="text/plain"
    )


# -- students ---------------------------------------------------------------------------


class LoadStudent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    """A student in the registry (``$RETORT_HOME/students/<name>``)."""


def _pool(gw: Gateway) -> StudentPool:
    pool = gw.routes.students
    if pool is None:
        raise ServiceUnavailableError("Students are not enabled.", code="students_disabled")
    return pool


def _student_json(pool: StudentPool, name: str) -> dict[str, Any]:
    engine = pool.get(name)
    out: dict[str, Any] = {"name": name, "loaded": engine is not None}
    if engine is not None:
        out["max_model_len"] = engine.max_model_len
    return out


@get("/students", summary="List loaded and registered students")
async def list_students(gateway: Gateway) -> Response[bytes]:
    pool = _pool(gateway)
    entries = await asyncio.to_thread(pool.registry.list)
    registered = [
        {
            "name": e.name,
            "teacher_model": e.manifest.teacher_model,
            "adapter": e.manifest.adapter,
            "precision": e.manifest.precision,
            "loaded": pool.get(e.name) is not None,
            "report": e.manifest.report,
        }
        for e in entries
    ]
    return _json({"loaded": sorted(pool.loaded()), "registered": registered})


@post(
    "/students",
    status_code=200,
    summary="Load (hot) a registered student; it is then served under its name",
)
async def load_student(data: LoadStudent, gateway: Gateway) -> Response[bytes]:
    pool = _pool(gateway)
    taken = {n for n, _, _ in gateway.routes.model_ids() if pool.get(n) is None}
    pool.check_not_taken(data.name, taken)
    await pool.load(data.name)
    return _json(_student_json(pool, data.name))


@delete(
    "/students/{name:str}",
    status_code=200,
    summary="Unload a student (in-flight requests finish first)",
)
async def unload_student(name: str, gateway: Gateway) -> Response[bytes]:
    pool = _pool(gateway)
    await pool.unload(name)
    return _json({"name": name, "loaded": False})


@get(
    "/students/{name:str}/shadow",
    summary="A student's shadow evaluation: agreement, latency and cost against its teacher",
)
async def student_shadow(name: str, gateway: Gateway, limit: int = 20) -> Response[bytes]:
    """The latest pairs (up to ``limit``) and a summary over the last ``shadow.window``."""
    runner = gateway.shadow
    if runner is None or gateway.promptlog is None or gateway.promptlog.store is None:
        raise ServiceUnavailableError(
            "Shadow evaluation is off (shadow.teachers, with the prompt log on).",
            code="shadow_disabled",
        )
    store = gateway.promptlog.store
    window = await store.shadow_pairs(student=name, limit=runner.settings.window)
    compared = [p for p in window if p["agree"] is not None]
    lat_s = sorted(p["student_latency_s"] for p in compared)
    lat_t = sorted(p["teacher_latency_s"] for p in compared)

    def p95(xs: list[float]) -> float | None:
        return xs[min(len(xs) - 1, int(0.95 * len(xs)))] if xs else None

    summary = {
        "student": name,
        "pairs": len(window),
        "compared": len(compared),
        "errors": sum(1 for p in window if p["outcome"] == "error"),
        "agreement": sum(1 for p in compared if p["agree"]) / len(compared) if compared else None,
        "student_p95_latency_s": p95(lat_s),
        "teacher_p95_latency_s": p95(lat_t),
        "student_cost_usd": sum(p["student_cost_usd"] or 0.0 for p in compared),
        "teacher_cost_usd": sum(p["teacher_cost_usd"] for p in compared),
    }
    return _json({"summary": summary, "pairs": window[: max(0, min(limit, 200))]})


ADMIN_HANDLERS = [
    list_adapters,
    load_adapter,
    unload_adapter,
    pin_adapter,
    list_students,
    load_student,
    unload_student,
    student_shadow,
    *ROLLOUT_HANDLERS,
]
LORA_HANDLERS = [vllm_load, vllm_unload]
