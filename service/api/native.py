"""The service's own protocol: ``POST /score`` (any item shape, optionally normalized) and ``POST /compare``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, scoring_of
from service.schemas import CompareRequest, CompareResponse, ScoreRequest, ScoreResponse
from service.scoring import Item

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)


@router.post("/score", response_model=ScoreResponse, response_model_exclude_none=True)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Score items: `{"text"}`, `{"prompt", "response"}` (concatenated, as in TRL) or `{"messages"}`. With several
    reward models served combined, `scores` are the combined rewards and `components` each model's own."""
    service = scoring_of(request)
    items = [Item.of(item.as_item(), ("body", "items", i)) for i, item in enumerate(body.items)]
    scored = await service.score(request, items, field="items", normalize_scores=body.normalize)
    model = service.model
    return ScoreResponse(
        scores=scored.scores,
        truncated=scored.truncated,
        model=model.name,
        model_version=model.version,
        normalized=body.normalize,
        components={name: part.scores for name, part in scored.components.items()} or None,
    )


@router.post("/compare", response_model=CompareResponse, response_model_exclude_none=True)
async def compare(body: CompareRequest, request: Request) -> CompareResponse:
    """Preference margins r(chosen) - r(rejected) and sigmoid(margin), for evaluation and best-of-n."""
    service = scoring_of(request)
    pairs = [Item.of(pair.as_row(), ("body", "pairs", i)) for i, pair in enumerate(body.pairs)]
    compared = await service.compare(request, pairs)
    model = service.model
    return CompareResponse(
        margins=compared.margins,
        probabilities=compared.probabilities,
        chosen_scores=compared.chosen,
        rejected_scores=compared.rejected,
        model=model.name,
        model_version=model.version,
        components={name: part.margins for name, part in compared.components.items()} or None,
    )
