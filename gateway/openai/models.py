"""``GET /v1/models``: the base model first, then its loaded adapters."""

from __future__ import annotations

from litestar import Response, get

from gateway.openai.protocol import ModelCard, ModelList, encode
from gateway.state import Gateway

__all__ = ["list_models"]


@get("/models", summary="List models")
async def list_models(gateway: Gateway) -> Response[bytes]:
    created = gateway.started_at
    cards = [
        ModelCard(
            id=name,
            created=created,
            owned_by="retort",
            parent=parent,
            root=parent or name,
            max_model_len=max_len,
        )
        for name, parent, max_len in gateway.routes.model_ids()
    ]
    return Response(encode(ModelList(data=cards)), media_type="application/json")
