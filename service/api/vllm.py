"""vLLM's pooling classify API (``POST /classify``, also ``/v1/classify``, as SGLang serves it), for a reward model.

Requests and answers have vLLM's shapes, so vLLM's and SGLang's classify clients can point here. Each input is one
item: a text is scored whole (``{"text"}``), a ``messages`` list is rendered with the model's chat template. The
answer's ``probs`` holds one value per input: the raw score, unless ``use_activation`` (or the older
``activation``) is true, then its sigmoid, which is what vLLM's classify activation computes for a one-logit model.
Note that vLLM *defaults* to the activation for a one-logit classifier; this service defaults to the raw score,
as vLLM does when started with ``--pooler-config '{"use_activation": false}'``. A ``model`` other than the served
one gets vLLM's 404 ("The model `x` does not exist.").
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, runtime_of, scoring_of
from service.errors import ModelNotFound
from service.schemas import ClassificationData, ClassificationResponse, ClassifyRequest, ClassifyUsage
from service.scoring import Item, sigmoid

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)
_NOT_FOUND = {404: {"description": "the request's model is not the served one"}}


@router.post("/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
@router.post("/v1/classify", response_model=ClassificationResponse, responses=_NOT_FOUND)
async def classify(body: ClassifyRequest, request: Request) -> ClassificationResponse:
    """vLLM-compatible classification: `{"model", "input"}` or `{"model", "messages"}`, one value per input."""
    service = scoring_of(request)
    model = service.model
    if body.model is not None and body.model not in (model.name, model.source, runtime_of(request).settings.model):
        raise ModelNotFound(f"The model `{body.model}` does not exist. This service serves `{model.name}`.")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
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
    values = [sigmoid(s) for s in scored.scores] if body.activated else scored.scores
    tokens = sum(scored.tokens)
    return ClassificationResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model.name,
        data=[ClassificationData(index=i, label=label, probs=[v], num_classes=1) for i, v in enumerate(values)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
