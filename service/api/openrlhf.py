"""OpenRLHF's remote reward model protocol: ``POST /get_reward``.

OpenRLHF posts ``{"query": [...], "prompts": [...], "labels": [...]}`` where each query is the full decoded
sequence (prompt + response, special tokens kept), and reads ``rewards`` (advantages), ``scores`` (dynamic
filtering) and ``extra_logs``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, scoring_of
from service.schemas import GetRewardRequest, GetRewardResponse
from service.scoring import Item

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(body: GetRewardRequest, request: Request) -> GetRewardResponse:
    """OpenRLHF's remote reward model: `--remote_rm_url` / `--reward.remote_url http://HOST:PORT/get_reward`."""
    items = [Item({"text": q}, ("body", "query", i), q) for i, q in enumerate(body.query)]
    scored = await scoring_of(request).score(request, items, field="query")
    return GetRewardResponse(
        rewards=scored.scores,
        scores=scored.scores,
        extra_logs={},
    )
