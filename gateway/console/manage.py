"""Adapters (registry and loaded set; load, unload, pin, unpin), students (reports, live
figures), distillation runs, and the overview. Actions go through the same managers as
``/admin``, and their errors are shown as the API returns them."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, get, post
from litestar.response import File, Template

from gateway.console.overview import sparkline
from gateway.console.rollout import rollout_view
from gateway.console.session import csrf_form
from gateway.console.views import error_json, gateway_of, render, store_of
from gateway.errors import APIError, NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from gateway.adapters import AdapterManager
    from gateway.console.overview import Sampler, SeriesStats
    from gateway.studentpool import StudentPool

__all__ = ["MANAGE_HANDLERS"]

RUNS_SHOWN = 50


def _folder_bytes(path: Path) -> int | None:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return None


def _manager(request: Request[Any, Any, Any]) -> AdapterManager:
    adapters = gateway_of(request).routes.adapters
    if adapters is None:
        raise ServiceUnavailableError(
            "LoRA is not enabled: set engine.enable_lora: true.", code="lora_disabled"
        )
    return adapters


def _adapter_rows(manager: AdapterManager) -> list[dict[str, Any]]:
    """``GET /admin/adapters``'s list, with each adapter's rank, base and size on disk."""
    entries = {e.name: e for e in manager.registry.list()}
    rows = []
    for item in manager.available():
        entry = entries.get(item["name"])
        manifest = entry.manifest if entry is not None else None
        path = Path(item["path"]) if item.get("path") else None
        rows.append(
            {
                **item,
                "rank": manifest.rank if manifest is not None else None,
                "base_model": manifest.base_model if manifest is not None else None,
                "source": manifest.source if manifest is not None else None,
                "size": _folder_bytes(path) if path is not None else None,
                "valid": item.get("valid", True),
            }
        )
    return rows


async def _adapters_page(
    request: Request[Any, Any, Any],
    *,
    status_code: int = 200,
    error: APIError | None = None,
    message: str | None = None,
) -> Template:
    rows: list[dict[str, Any]] = []
    unavailable = None
    try:
        manager = _manager(request)
        rows = await asyncio.to_thread(_adapter_rows, manager)
        max_loaded = manager.max_loaded
    except APIError as exc:
        unavailable, max_loaded = exc.message, 0
    hx = request.headers.get("hx-request") == "true"
    return render(
        request,
        "adapters_panel.html" if hx else "adapters.html",
        status_code=status_code,
        rows=rows,
        max_loaded=max_loaded,
        unavailable=unavailable,
        error=error_json(error) if error is not None else None,
        error_status=error.status_code if error is not None else None,
        message=message,
    )


@get("/adapters", name="console:adapters")
async def adapters_page(request: Request[Any, Any, Any]) -> Template:
    return await _adapters_page(request)


async def _adapter_action(request: Request[Any, Any, Any], action: str, name: str) -> Template:
    form = await csrf_form(request)
    try:
        manager = _manager(request)
        if action == "load":
            name = str(form.get("name") or "").strip()
            path = str(form.get("path") or "").strip() or None
            pinned = form.get("pinned") in ("on", "true", "1")
            await manager.load(name, path, pinned=pinned)
            message = f"Loaded {name}" + (" (pinned)." if pinned else ".")
        elif action == "unload":
            await manager.unload(name)
            message = f"Unloaded {name}."
        else:
            pinned = form.get("pinned") in ("true", "1", "on")
            manager.pin(name, pinned)
            message = f"{'Pinned' if pinned else 'Unpinned'} {name}."
    except APIError as exc:
        return await _adapters_page(request, status_code=exc.status_code, error=exc)
    return await _adapters_page(request, message=message)


@post("/adapters/load", name="console:adapter-load", status_code=200)
async def adapter_load(request: Request[Any, Any, Any]) -> Template:
    return await _adapter_action(request, "load", "")


@post("/adapters/{name:str}/unload", name="console:adapter-unload", status_code=200)
async def adapter_unload(request: Request[Any, Any, Any], name: str) -> Template:
    return await _adapter_action(request, "unload", name)


@post("/adapters/{name:str}/pin", name="console:adapter-pin", status_code=200)
async def adapter_pin(request: Request[Any, Any, Any], name: str) -> Template:
    return await _adapter_action(request, "pin", name)


# -- students and distillation runs ------------------------------------------------------


def _pool(request: Request[Any, Any, Any]) -> StudentPool | None:
    router = gateway_of(request).router
    return router.students if router is not None else None


def _sampler(request: Request[Any, Any, Any]) -> Sampler:
    sampler: Sampler = request.app.state.console.sampler
    return sampler


def _live(request: Request[Any, Any, Any]) -> dict[str, SeriesStats]:
    return {s.model: s for s in _sampler(request).stats() if s.adapter == "none"}


def _student_rows(pool: StudentPool) -> list[dict[str, Any]]:
    rows = []
    for e in pool.registry.list():
        report = e.manifest.report or {}
        rows.append(
            {
                "name": e.name,
                "teacher_model": e.manifest.teacher_model,
                "adapter": e.manifest.adapter,
                "precision": e.manifest.precision,
                "created": e.manifest.created or None,
                "loaded": pool.get(e.name) is not None,
                "report": report,
                "size": _folder_bytes(e.onnx_path),
                "has_png": (e.path / "report.png").is_file(),
            }
        )
    return rows


async def _runs(request: Request[Any, Any, Any]) -> tuple[list[dict[str, Any]], str | None]:
    store = store_of(request)
    if store is None:
        return [], "The prompt log is off, so there is no record of distillation runs."
    runs = await store.list_distill_runs(limit=RUNS_SHOWN)

    def check_pngs() -> None:
        for run in runs:
            out = run.get("out_dir")
            run["has_png"] = bool(out) and (Path(str(out)) / "report.png").is_file()

    await asyncio.to_thread(check_pngs)
    return runs, None


@get("/students", name="console:students")
async def students_page(request: Request[Any, Any, Any]) -> Template:
    pool = _pool(request)
    rows = await asyncio.to_thread(_student_rows, pool) if pool is not None else []
    runs, runs_error = await _runs(request)
    return render(
        request,
        "students.html",
        rows=rows,
        live=_live(request),
        runs=runs,
        runs_error=runs_error,
        registered={r["name"] for r in rows},
        unavailable=None if pool is not None else "The engine is still starting.",
    )


def _student(request: Request[Any, Any, Any], name: str) -> Any:
    from gateway.students import StudentError

    pool = _pool(request)
    if pool is None:
        raise ServiceUnavailableError("The engine is still starting.")
    try:
        return pool.registry.get(name)
    except StudentError as exc:
        raise NotFoundError(f"No student `{name}`.", param="name") from exc


def _read_report(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, msgspec.DecodeError):
        data = msgspec.json.decode((folder / "report.json").read_bytes())
        return data if isinstance(data, dict) else None
    return None


@get("/students/{name:str}", name="console:student")
async def student_page(request: Request[Any, Any, Any], name: str) -> Template:
    entry = _student(request, name)
    pool = _pool(request)
    report = await asyncio.to_thread(_read_report, entry.path)
    return render(
        request,
        "student.html",
        name=entry.name,
        manifest=entry.manifest,
        loaded=pool is not None and pool.get(entry.name) is not None,
        report=report or entry.manifest.report or {},
        report_json=(
            msgspec.json.format(msgspec.json.encode(report), indent=2).decode() if report else None
        ),
        has_png=(entry.path / "report.png").is_file(),
        live=_live(request).get(entry.name),
        size=_folder_bytes(entry.onnx_path),
        rollout=await rollout_view(request, entry.name),
    )


def _png(path: Path) -> File:
    if not path.is_file():
        raise NotFoundError("No report.png there.")
    return File(path=path, media_type="image/png", content_disposition_type="inline")


@get("/students/{name:str}/report.png", name="console:student-png")
async def student_png(request: Request[Any, Any, Any], name: str) -> File:
    return _png(_student(request, name).path / "report.png")


async def _run(request: Request[Any, Any, Any], run_id: str) -> dict[str, Any]:
    runs, _ = await _runs(request)
    for run in runs:
        if run["run_id"] == run_id:
            return run
    raise NotFoundError(f"No distillation run `{run_id}`.", param="run_id")


@get("/runs/{run_id:str}", name="console:run")
async def run_page(request: Request[Any, Any, Any], run_id: str) -> Template:
    run = await _run(request, run_id)
    out = run.get("out_dir")
    report = await asyncio.to_thread(_read_report, Path(out)) if out else None
    return render(
        request,
        "run.html",
        run=run,
        report=report or run.get("summary") or {},
        report_json=(
            msgspec.json.format(msgspec.json.encode(report), indent=2).decode() if report else None
        ),
    )


@get("/runs/{run_id:str}/report.png", name="console:run-png")
async def run_png(request: Request[Any, Any, Any], run_id: str) -> File:
    run = await _run(request, run_id)
    if not run.get("out_dir"):
        raise NotFoundError("This run has no output folder.")
    return _png(Path(run["out_dir"]) / "report.png")


# -- overview ------------------------------------------------------------------------------


@get(["/", "/overview"], name="console:overview")
async def overview(request: Request[Any, Any, Any]) -> Template:
    sampler = _sampler(request)
    stats = sampler.stats()
    return render(
        request,
        "overview.html",
        stats=stats,
        covered_min=sampler.covered_s / 60,
        interval_s=sampler.interval_s,
        spark=sparkline,
        metrics_on=sampler.metrics is not None,
    )


MANAGE_HANDLERS = [
    adapters_page,
    adapter_load,
    adapter_unload,
    adapter_pin,
    students_page,
    student_page,
    student_png,
    run_page,
    run_png,
    overview,
]
