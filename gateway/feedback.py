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

__all__ = ["FeedbackRequest", "feedback"]


class FeedbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    score: float
    comment: Annotated[str, msgspec.Meta(max_length=10_000)] | None = None


class FeedbackResponse(msgspec.Struct, kw_only=True, tag_field="object", tag="feedback"):
    request_id: str
    score: float
    comment: str | None = None


@post("/feedback", status_code=201, summary="Score a logged request")
async def feedback(data: FeedbackRequest, gateway: Gateway) -> Response[bytes]:
    if not math.isfinite(data.score):
        raise BadRequestError("`score` must be a finite number.", param="score")
    plog = gateway.promptlog
    if plog is None or not plog.enabled:
        raise NotFoundError(
            f"No logged request has the id `{data.request_id}` (the prompt log is off).",
            param="request_id",
        )
    rid = data.request_id
    found = await plog.add_feedback(rid, data.score, data.comment)
    if not found and strip_id_prefix(rid) != rid:
        rid = strip_id_prefix(rid)
        found = await plog.add_feedback(rid, data.score, data.comment)
    if not found:
        raise NotFoundError(
            f"No logged request has the id `{data.request_id}`.", param="request_id"
        )
    body = FeedbackResponse(request_id=rid, score=data.score, comment=data.comment)
    return Response(msgspec.json.encode(body), status_code=201, media_type="application/json")
