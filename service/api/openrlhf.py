"""OpenRLHF's remote reward model protocol: ``POST /get_reward``.

OpenRLHF posts ``{"query": [...], "prompts": [...], "labels": [...]}`` where each query is the full decoded
sequence (prompt + response, special tokens kept), and reads ``rewards`` (advantages), ``scores`` (dynamic
filtering) and ``extra_logs`` (per-sample values it turns into tensors and logs). Given several URLs it shards a
batch over them, so a replica can be sent an empty ``query``; that is answered with empty lists, and ``extra_logs``
keeps its keys so that shards merge key by key. With several reward models served combined, ``rewards`` are the
combined rewards and ``extra_logs`` has each model's scores under its name.
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
    # floats, not booleans: OpenRLHF makes a tensor of each value and averages it for its logs
    logs = {"truncated": [float(t) for t in scored.truncated]}
    # several models: each one's score, logged by OpenRLHF under its name
    logs.update({name: part.scores for name, part in scored.components.items()})
    return GetRewardResponse(rewards=scored.scores, scores=scored.scores, extra_logs=logs)
