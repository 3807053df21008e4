"""``POST /v1/feedback``: a human score (and comment) on a logged request.

The distillation pipeline filters and weights its data by it. ``request_id`` is the
request's ``x-request-id`` or the response's ``id`` (``chatcmpl-...``/``cmpl-...``).
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from litestar import Response, post

from gateway.errors import BadRequestError, NotFoundError
from gateway.openai.serving import strip_id_prefix
from gateway.state import Gateway

__all__ = ["FeedbackRequest", "feedback", "record_feedback"]


class FeedbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    score: float
    comment: Annotated[str, msgspec.Meta(max_length=10_000)] | None = None
    correction: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    """A corrected answer (what the model should have said)."""


class FeedbackResponse(msgspec.Struct, kw_only=True, tag_field="object", tag="feedback"):
    request_id: str
    score: float
    comment: str | None = None
    correction: str | msgspec.UnsetType = msgspec.UNSET
    """Echoed only when the request gave one."""


async def record_feedback(
    gateway: Gateway,
    request_id: str,
    score: float,
    comment: str | None = None,
    correction: str | None = None,
) -> str:
    """Store feedback on a logged request (``/v1/feedback`` and the console's rating form);
    returns the request id it was stored under. 400 for a non-finite score, 404 for an
    unknown id or with the prompt log off."""
    if not math.isfinite(score):
        raise BadRequestError("`score` must be a finite number.", param="score")
    plog = gateway.promptlog
    if plog is None or not plog.enabled:
        raise NotFoundError(
            f"No logged request has the id `{request_id}` (the prompt log is off).",
            param="request_id",
        )
    rid = request_id
    found = await plog.add_feedback(rid, score, comment, correction)
    if not found and strip_id_prefix(rid) != rid:
        rid = strip_id_prefix(rid)
        found = await plog.add_feedback(rid, score, comment, correction)
    if not found:
        raise NotFoundError(f"No logged request has the id `{request_id}`.", param="request_id")
    return rid


@post("/feedback", status_code=201, summary="Score a logged request")
async def feedback(data: FeedbackRequest, gateway: Gateway) -> Response[bytes]:
    rid = await record_feedback(gateway, data.request_id, data.score, data.comment, data.correction)
    body = FeedbackResponse(
        request_id=rid,
        score=data.score,
        comment=data.comment,
        correction=data.correction if data.correction is not None else msgspec.UNSET,
    )
    return Response(msgspec.json.encode(body), status_code=201, media_type="application/json")
