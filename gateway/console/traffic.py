"""Traffic: the prompt log, filtered and paginated; a request's page; rating; the rating
queue; the JSONL export (``retort logs export``'s code path)."""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from litestar import Request, get, post
from litestar.background_tasks import BackgroundTask
from litestar.response import File, Redirect, Template

from gateway.console.session import csrf_form
from gateway.console.views import gateway_of, render, store_of
from gateway.errors import BadRequestError, NotFoundError
from gateway.feedback import record_feedback
from retort.db.export import export_logs, parse_time
from retort.db.filters import RowFilter

if TYPE_CHECKING:
    from retort.db.store import PromptStore

__all__ = ["TRAFFIC_HANDLERS", "TrafficFilters"]

PAGE_SIZE = 25
QUEUE_SCAN = 500
"""How many unrated requests the queue looks through to find the one after the current."""
FEEDBACK_CHOICES = ("", "unrated", "rated")
SERVED_BY = ("", "engine", "student")
STATUSES = ("", "ok", "error")
MAX_TEXT = 1000


def _score(text: str, name: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(f"`{name}` must be a number.", param=name) from None
    if not math.isfinite(value):
        raise BadRequestError(f"`{name}` must be a finite number.", param=name)
    return value


@dataclass
class TrafficFilters:
    """The traffic view's filters, as the query string carries them."""

    model: str = ""
    adapter: str = ""
    served_by: str = ""
    status: str = ""
    since: str = ""
    until: str = ""
    feedback: str = ""
    min_score: str = ""
    max_score: str = ""
    q: str = ""
    page: int = 1
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_query(cls, query: Any) -> TrafficFilters:
        def one(name: str) -> str:
            value = query.get(name) or ""
            return str(value).strip()[:MAX_TEXT]

        f = cls(
            model=one("model"),
            adapter=one("adapter"),
            served_by=one("served_by"),
            status=one("status"),
            since=one("since"),
            until=one("until"),
            feedback=one("feedback"),
            min_score=one("min_score"),
            max_score=one("max_score"),
            q=one("q"),
        )
        page = one("page") or "1"
        if not page.isdigit() or int(page) < 1:
            f.errors.append("`page` must be a positive whole number.")
        else:
            f.page = int(page)
        for name, allowed in (
            ("served_by", SERVED_BY),
            ("status", STATUSES),
            ("feedback", FEEDBACK_CHOICES),
        ):
            if getattr(f, name) not in allowed:
                f.errors.append(f"`{name}` must be one of {', '.join(a for a in allowed if a)}.")
        return f

    def row_filter(self) -> RowFilter:
        """The store's filter for these (400 on a bad value)."""
        if self.errors:
            raise BadRequestError(" ".join(self.errors))
        times: dict[str, float | None] = {}
        for name in ("since", "until"):
            text = getattr(self, name)
            try:
                times[name] = parse_time(text) if text else None
            except ValueError as exc:
                raise BadRequestError(str(exc), param=name) from None
        return RowFilter(
            model=self.model or None,
            adapter=self.adapter or None,
            served_by=self.served_by or None,
            status=self.status or None,
            search=self.q or None,
            rated={"": None, "unrated": False, "rated": True}[self.feedback],
            min_score=_score(self.min_score, "min_score"),
            max_score=_score(self.max_score, "max_score"),
            since=times["since"],
            until=times["until"],
        )

    def query(self, **override: Any) -> str:
        """The query string of these filters (empty ones left out), with overrides."""
        values = {
            "model": self.model,
            "adapter": self.adapter,
            "served_by": self.served_by,
            "status": self.status,
            "since": self.since,
            "until": self.until,
            "feedback": self.feedback,
            "min_score": self.min_score,
            "max_score": self.max_score,
            "q": self.q,
            "page": self.page if self.page != 1 else "",
        }
        values.update(override)
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})


def _known_names(request: Request[Any, Any, Any]) -> list[str]:
    router = gateway_of(request).router
    if router is None:
        return []
    return sorted({name for name, _, _ in router.model_ids()})


def _require_store(request: Request[Any, Any, Any]) -> PromptStore:
    store = store_of(request)
    if store is None:
        raise NotFoundError("The prompt log is off (promptlog.enabled: false) or not open yet.")
    return store


@get("/traffic", name="console:traffic")
async def traffic(request: Request[Any, Any, Any]) -> Template:
    filters = TrafficFilters.from_query(request.query_params)
    store = store_of(request)
    rows: list[dict[str, Any]] = []
    total = 0
    error = None
    status = 200
    if store is None:
        error = "The prompt log is off (promptlog.enabled: false) or not open yet."
    else:
        try:
            where = filters.row_filter()
        except BadRequestError as exc:
            error, status = exc.message, 400
        else:
            rows, total = await store.page(
                where, offset=(filters.page - 1) * PAGE_SIZE, limit=PAGE_SIZE
            )
    pages = max(1, math.ceil(total / PAGE_SIZE))
    template = "traffic_table.html" if request.headers.get("hx-request") == "true" else None
    return render(
        request,
        template or "traffic.html",
        status_code=status,
        filters=filters,
        rows=rows,
        total=total,
        pages=pages,
        names=_known_names(request),
        error=error,
        served_by_choices=SERVED_BY,
        status_choices=STATUSES,
    )


def _scratch_file() -> Path:
    fd, tmp = tempfile.mkstemp(prefix="retort-console-export-", suffix=".jsonl")
    os.close(fd)
    return Path(tmp)


@get("/traffic/export.jsonl", name="console:export")
async def export_jsonl(request: Request[Any, Any, Any]) -> File:
    """The filtered log as JSONL, written by ``retort logs export``'s writer."""
    store = _require_store(request)
    where = TrafficFilters.from_query(request.query_params).row_filter()
    path = await asyncio.to_thread(_scratch_file)
    try:
        await export_logs(store, "jsonl", path, where)
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    return File(
        path=path,
        filename="retort-log.jsonl",
        media_type="application/jsonl",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )


async def _queue_rows(store: PromptStore, queue: dict[str, str]) -> list[dict[str, Any]]:
    where = RowFilter(
        rated=False, model=queue.get("model") or None, adapter=queue.get("adapter") or None
    )
    rows, _ = await store.page(where, offset=0, limit=QUEUE_SCAN, oldest_first=True)
    return rows


def _queue_of(query: Any) -> dict[str, str]:
    return {k: str(query.get(k)) for k in ("adapter", "model") if query.get(k)}


async def _next_unrated(
    store: PromptStore, queue: dict[str, str], after: str | None = None
) -> str | None:
    """The oldest unrated request of the queue; with ``after``, the one after it."""
    rows = await _queue_rows(store, queue)
    ids = [r["request_id"] for r in rows]
    if after is not None and after in ids:
        i = ids.index(after)
        return ids[i + 1] if i + 1 < len(ids) else None
    return ids[0] if ids else None


def _request_url(request_id: str, queue: dict[str, str]) -> str:
    qs = urlencode({"queue": "1", **queue}) if queue else ""
    return f"/console/requests/{request_id}" + (f"?{qs}" if qs else "")


@get("/requests/{request_id:str}", name="console:request")
async def request_page(request: Request[Any, Any, Any], request_id: str) -> Template:
    store = _require_store(request)
    found = await store.query(RowFilter(request_id=request_id), limit=1)
    if not found:
        raise NotFoundError(f"No logged request has the id `{request_id}`.", param="request_id")
    row = found[0]
    queue = _queue_of(request.query_params) if request.query_params.get("queue") else {}
    next_id = await _next_unrated(store, queue, after=request_id) if queue else None
    return render(
        request,
        "request.html",
        row=row,
        feedback=await store.feedback_for(request_id),
        shadow=await store.shadow_pairs(request_id=request_id, limit=5),
        queue=queue,
        queue_query=urlencode(queue),
        next_url=_request_url(next_id, queue) if next_id else None,
        saved=request.query_params.get("saved") == "1",
    )


def _rating(form: Any) -> float:
    verdict = str(form.get("verdict") or "")
    if verdict == "up":
        return 1.0
    if verdict == "down":
        return 0.0
    if verdict:
        raise BadRequestError("`verdict` must be up or down.", param="verdict")
    score = _score(str(form.get("score") or ""), "score")
    if score is None:
        raise BadRequestError("Give a thumbs up or down, or a score.", param="score")
    if not 0.0 <= score <= 1.0:
        raise BadRequestError("`score` must be between 0 and 1.", param="score")
    return score


@post("/requests/{request_id:str}/rate", name="console:rate", status_code=303)
async def rate(request: Request[Any, Any, Any], request_id: str) -> Redirect:
    """Store a rating through ``/v1/feedback``'s path; then the queue's next unrated request
    (when rating a queue) or the request's page again."""
    form = await csrf_form(request)
    score = _rating(form)
    comment = str(form.get("comment") or "").strip() or None
    correction = str(form.get("correction") or "").strip() or None
    gw = gateway_of(request)
    await record_feedback(gw, request_id, score, comment, correction)
    queue = _queue_of(form) if form.get("queue") else {}
    if queue:
        store = _require_store(request)
        next_id = await _next_unrated(store, queue)
        if next_id is None:
            return Redirect(f"/console/queue?{urlencode({**queue, 'done': '1'})}", status_code=303)
        return Redirect(_request_url(next_id, queue), status_code=303)
    return Redirect(f"/console/requests/{request_id}?saved=1", status_code=303)


@get("/queue", name="console:queue")
async def queue_page(request: Request[Any, Any, Any]) -> Template:
    """Unrated requests of one adapter (or model), oldest first."""
    queue = _queue_of(request.query_params)
    store = store_of(request)
    rows: list[dict[str, Any]] = []
    queues: dict[str, list[dict[str, Any]]] = {}
    error = None
    if store is None:
        error = "The prompt log is off (promptlog.enabled: false) or not open yet."
    elif queue:
        rows = await _queue_rows(store, queue)
    else:
        queues = await store.unrated_counts()
    return render(
        request,
        "queue.html",
        queue=queue,
        queues=queues,
        rows=rows,
        error=error,
        names=_known_names(request),
        done=request.query_params.get("done") == "1",
        start_url=_request_url(rows[0]["request_id"], queue) if rows else None,
    )


TRAFFIC_HANDLERS = [traffic, export_jsonl, request_page, rate, queue_page]
