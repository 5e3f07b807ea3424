"""slime's remote reward model protocol: ``POST /reward``.

slime (``--rm-type remote_rm --rm-url URL``) posts one sample at a time, ``{"prompt", "response", "label"}``, to
the URL as given, and takes the JSON answer as the reward, or ``answer[reward_key]`` with ``--reward-key``. This
route answers ``{"reward": x}``, so ``--reward-key reward``. A string prompt is scored as ``{"prompt", "response"}``
(the shape a reward model is trained on); a message-list prompt as those messages plus the response as the
assistant's turn.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.common import SCORING_ERRORS, scoring_of
from service.schemas import SlimeRewardRequest, SlimeRewardResponse, plain_messages
from service.scoring import Item

router = APIRouter(tags=["scoring"], responses=SCORING_ERRORS)


@router.post("/reward", response_model=SlimeRewardResponse)
async def reward(body: SlimeRewardRequest, request: Request) -> SlimeRewardResponse:
    """slime's remote reward model: `--rm-type remote_rm --rm-url http://HOST:PORT/reward --reward-key reward`."""
    if isinstance(body.prompt, str):
        payload = {"prompt": body.prompt, "response": body.response}
        source = payload
    else:
        messages = plain_messages(body.prompt)
        payload = {"messages": [*messages, {"role": "assistant", "content": body.response}]}
        source = {"prompt": messages, "response": body.response}
    scored = await scoring_of(request).score(request, [Item(payload, ("body",), source)], field="prompt")
    return SlimeRewardResponse(reward=scored.scores[0])
