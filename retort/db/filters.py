"""Which logged requests a read selects: one typed filter for every reader of the log.

:class:`RowFilter` is what :meth:`PromptStore.iter_rows <retort.db.store.PromptStore.iter_rows>`,
``query`` and ``page`` take, and what ``retort logs export``, the console's traffic view and
the distillation dataset build. :func:`select_rows` turns it into the SELECT (each row with
its mean feedback ``score`` and ``feedback_count``).
"""

from __future__ import annotations

from typing import Any

import msgspec
import sqlalchemy as sa

from retort.db.schema import feedback, requests

__all__ = ["RowFilter", "select_rows"]


class RowFilter(msgspec.Struct, kw_only=True, frozen=True):
    """Rows matching every field that is set (``None``: any)."""

    model: str | None = None
    adapter: str | None = None
    since: float | None = None
    """Created at or after (unix seconds)."""
    until: float | None = None
    """Created before (unix seconds)."""
    min_score: float | None = None
    """Mean feedback score at least this (rows without feedback drop out)."""
    max_score: float | None = None
    """Mean feedback score at most this."""
    status: str | None = None
    served_by: str | None = None
    request_id: str | None = None
    rated: bool | None = None
    """Only rows with (``True``) or without (``False``) feedback."""
    search: str | None = None
    """Case-insensitive text in the messages, prompt, completion or request id."""


def select_rows(where: RowFilter) -> sa.Select[Any]:
    """The requests matching ``where``, each with ``score`` and ``feedback_count``."""
    fb = (
        sa.select(
            feedback.c.request_id,
            sa.func.avg(feedback.c.score).label("score"),
            sa.func.count().label("feedback_count"),
        )
        .group_by(feedback.c.request_id)
        .subquery("fb")
    )
    stmt = sa.select(requests, fb.c.score, fb.c.feedback_count).select_from(
        requests.outerjoin(fb, fb.c.request_id == requests.c.request_id)
    )
    if where.model is not None:
        stmt = stmt.where(requests.c.model == where.model)
    if where.adapter is not None:
        stmt = stmt.where(requests.c.adapter == where.adapter)
    if where.since is not None:
        stmt = stmt.where(requests.c.created >= where.since)
    if where.until is not None:
        stmt = stmt.where(requests.c.created < where.until)
    if where.min_score is not None:
        stmt = stmt.where(fb.c.score >= where.min_score)
    if where.max_score is not None:
        stmt = stmt.where(fb.c.score <= where.max_score)
    if where.status is not None:
        stmt = stmt.where(requests.c.status == where.status)
    if where.served_by is not None:
        stmt = stmt.where(requests.c.served_by == where.served_by)
    if where.request_id is not None:
        stmt = stmt.where(requests.c.request_id == where.request_id)
    if where.rated is not None:
        rated = fb.c.request_id.is_not(None) if where.rated else fb.c.request_id.is_(None)
        stmt = stmt.where(rated)
    if where.search:
        needle = where.search.lower()
        columns = (
            requests.c.completion,
            requests.c.prompt,
            sa.cast(requests.c.messages, sa.Text),
            requests.c.request_id,
        )
        stmt = stmt.where(
            sa.or_(*(sa.func.lower(c).contains(needle, autoescape=True) for c in columns))
        )
    return stmt
