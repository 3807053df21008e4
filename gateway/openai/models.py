"""``GET /v1/models``: the base model first, then its loaded adapters."""

from __future__ import annotations

from litestar import Response, get

from gateway.errors import ModelNotFoundError
from gateway.openai.guard import api_guard
from gateway.openai.protocol import ModelCard, ModelList, encode
from gateway.state import Gateway

__all__ = ["list_models", "retrieve_model"]


def _cards(gateway: Gateway) -> list[ModelCard]:
    created = gateway.started_at
    return [
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


@get("/v1/models", guards=[api_guard], summary="List models")
async def list_models(gateway: Gateway) -> Response[bytes]:
    return Response(encode(ModelList(data=_cards(gateway))), media_type="application/json")


@get("/v1/models/{model:path}", guards=[api_guard], summary="Retrieve a model")
async def retrieve_model(gateway: Gateway, model: str) -> Response[bytes]:
    """OpenAI ``RetrieveModel``: a served model (base, loaded adapter or student); any other
    name is a 404 ``model_not_found``. Ids may hold slashes (``org/model``)."""
    name = model.lstrip("/")
    card = next((c for c in _cards(gateway) if c.id == name), None)
    if card is None:
        raise ModelNotFoundError(name)
    return Response(encode(card), media_type="application/json")
