"""vLLM's OpenAI-compatible server, as far as a reward model serves it: ``POST /classify`` (also ``/v1/classify``,
as SGLang serves it) and ``GET /v1/models``.

Requests and answers have vLLM's shapes, so vLLM's and SGLang's classify clients and the OpenAI SDK can point here.
Each classify input is one item: a text is scored whole (``{"text"}``), a ``messages`` list is rendered with the
model's chat template. The answer's ``probs`` holds one value per input, with vLLM's classify activation applied as
vLLM applies it: the first of ``softmax``, ``activation``, ``use_activation`` that the request sets decides, and
without any of them the activation is on; for a one-logit model it is the sigmoid, and for a model whose config
declares ``problem_type: regression`` the identity (the raw score). A ``model`` other than the served one gets
vLLM's 404 ("The model `x` does not exist.").
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, runtime_of, scoring_of
from service.errors import ModelNotFound
from service.schemas import (
    ClassificationData,
    ClassificationResponse,
    ClassifyRequest,
    ClassifyUsage,
    ModelCard,
    ModelList,
    plain_messages,
)
from service.scoring import Item, sigmoid

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)
_NOT_FOUND = {404: {"description": "the request's model is not the served one"}}


@functools.cache
def _is_regression(model_dir: str) -> bool:
    """Whether the model's config declares ``problem_type: regression`` (vLLM then never applies an activation)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("problem_type") == "regression"


@router.post("/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
@router.post("/v1/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
async def classify(body: ClassifyRequest, request: Request) -> ClassificationResponse:
    """vLLM-compatible classification: `{"model", "input"}` or `{"model", "messages"}`, one value per input."""
    service = scoring_of(request)
    model = service.model
    if body.model is not None and body.model not in (model.name, model.source, runtime_of(request).settings.model):
        raise ModelNotFound(f"The model `{body.model}` does not exist. This service serves `{model.name}`.")
    if body.messages is not None:
        messages = plain_messages(body.messages)
        items = [Item({"messages": messages}, ("body", "messages"), messages)]
        field = "messages"
    elif isinstance(body.input, str):
        items = [Item({"text": body.input}, ("body", "input"), body.input)]
        field = "input"
    else:
        items = [Item({"text": t}, ("body", "input", i), t) for i, t in enumerate(body.input or [])]
        field = "input"
    scored = await service.score(request, items, field=field)
    label = (model.reward_label or "").partition(":")[2] or None
    activated = body.activated and not _is_regression(model.source)
    values = [sigmoid(s) for s in scored.scores] if activated else scored.scores
    tokens = sum(scored.tokens)
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model.name,
        data=[ClassificationData(index=i, label=label, probs=[v], num_classes=1) for i, v in enumerate(values)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The served model, as vLLM's `GET /v1/models` lists it (what vLLM's clients and the OpenAI SDK read first);
    503 while loading or draining, as the scoring routes (vLLM serves nothing until its model is loaded)."""
    with runtime_of(request).lifecycle.admit():
        model = scoring_of(request).model
    return ModelList(
        data=[ModelCard(id=model.name, root=model.source, max_model_len=model.formatting.get("max_length"))]
    )
