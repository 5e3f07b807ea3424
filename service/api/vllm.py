"""vLLM's OpenAI-compatible server, as far as a reward model serves it: ``POST /classify`` (also ``/v1/classify``,
as SGLang serves it) and ``GET /v1/models``.

Requests and answers have vLLM's shapes, so vLLM's and SGLang's classify clients and the OpenAI SDK can point here.
Each classify input is one item: a text is scored whole (``{"text"}``), a ``messages`` list is rendered with the
model's chat template. The answer's ``probs`` holds one value per input, with vLLM's classify activation applied as
vLLM applies it: the first of ``softmax``, ``activation``, ``use_activation`` that the request sets decides, and
without any of them the activation is on; for a one-logit model it is the sigmoid, and for a model whose config
declares ``problem_type: regression`` the identity (the raw score). A ``model`` other than the served one gets
vLLM's 404 ("The model `x` does not exist."). With several reward models served combined, the served one is their
combination (named ``a+b``), and ``model`` may name one of them to get its score alone.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, runtime_of, scoring_of
from service.backend import ModelInfo
from service.combined import Component
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
from service.scoring import Item, ScoringService, sigmoid

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


def _selected(service: ScoringService, requested: str | None, configured: Sequence[str]) -> Component | None:
    """The component a request's ``model`` names, or None for the served reward (the one model, or the
    combination); vLLM's 404 for anything else."""
    served = service.served
    if requested is None or requested == served.model.name:
        return None
    if not served.several:
        if requested in (served.model.source, *configured):
            return None
        raise ModelNotFound(f"The model `{requested}` does not exist. This service serves `{served.model.name}`.")
    component = served.component(requested)
    if component is None:
        names = ", ".join(f"`{n}`" for n in [served.model.name, *(c.name for c in served.components)])
        raise ModelNotFound(f"The model `{requested}` does not exist. This service serves {names}.")
    return component


@router.post("/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
@router.post("/v1/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
async def classify(body: ClassifyRequest, request: Request) -> ClassificationResponse:
    """vLLM-compatible classification: `{"model", "input"}` or `{"model", "messages"}`, one value per input. With
    several reward models served combined, `model` may name one of them to score with it alone."""
    service = scoring_of(request)
    paths = [path for _, path in runtime_of(request).settings.components]
    component = _selected(service, body.model, paths)
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
    scored = await service.score(request, items, field=field, component=component and component.name)
    models = [component.info] if component is not None else [c.info for c in service.served.components]
    model = component.info if component is not None else service.model
    label = (model.reward_label or "").partition(":")[2] or None
    activated = body.activated and not all(_is_regression(m.source) for m in models)
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
    with several reward models served combined, the combination first, then each of them. 503 while loading or
    draining, as the scoring routes (vLLM serves nothing until its model is loaded)."""
    with runtime_of(request).lifecycle.admit():
        served = scoring_of(request).served
    cards = [_card(served.model)]
    if served.several:
        cards[0].root = None
        cards += [_card(c.info) for c in served.components]
    return ModelList(data=cards)


def _card(model: ModelInfo) -> ModelCard:
    return ModelCard(id=model.name, root=model.source, max_model_len=model.formatting.get("max_length"))
