"""The scoring path shared by every protocol: admit, check limits, split pairs, score, normalize.

A protocol's route validates its body (its own schema), turns it into :class:`Item` s and hands them to the
:class:`ScoringService`: admission (:meth:`Lifecycle.admit`) -> :func:`check_limits` -> the engine's
:meth:`~service.engine.Scorer.run`: tokenize (a small request on the event loop, a larger one in a worker thread)
-> :meth:`Batcher.submit` -> wait for the future (bounded by the request timeout, abandoned if the client goes away)
-> scores in item order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.combined import Served
from service.engine import Scored, WaitForDisconnect
from service.errors import InvalidInput
from service.lifecycle import Lifecycle
from service.settings import ServeSettings
from training.checkpoint import normalize
from training.formatting import FormattingError, pair_side

if TYPE_CHECKING:
    from starlette.requests import Request

    from service.backend import ModelInfo
    from service.telemetry import RewardTelemetry

Loc = Sequence[str | int]


@dataclass(frozen=True)
class Item:
    """One thing to score, as a protocol hands it over.

    ``payload`` is the formatting contract's item (``{"text"}``, ``{"prompt", "response"}`` or ``{"messages"}``);
    ``loc`` is where it sits in the request body, for error messages (``("body", "query", 3)``); ``source`` is the
    part of the body it came from (a string, or a mapping of strings and message lists), walked for the per-text
    character cap so that an over-long text is named by its own path in the body.
    """

    payload: Mapping[str, Any]
    loc: Loc
    source: Any

    @classmethod
    def of(cls, payload: Mapping[str, Any], loc: Loc) -> Item:
        """An item whose body fields are the payload's own."""
        return cls(payload, loc, payload)


@dataclass(frozen=True)
class PairScores:
    """r(chosen) and r(rejected) of each preference pair, in order (and each component's, when several)."""

    chosen: list[float]
    rejected: list[float]
    components: dict[str, PairScores] = field(default_factory=dict)

    @property
    def margins(self) -> list[float]:
        return [c - r for c, r in zip(self.chosen, self.rejected, strict=True)]

    @property
    def probabilities(self) -> list[float]:
        """sigmoid(margin): the Bradley-Terry probability that the chosen answer is preferred."""
        return [sigmoid(m) for m in self.margins]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def check_limits(field: str, count: int, texts: Iterable[tuple[Loc, str]], *, max_items: int, max_chars: int) -> None:
    """422 for too many items or a text over the character cap; ``texts`` yields (path in the body, text)."""
    if count > max_items:
        raise InvalidInput(
            ["body", field],
            f"at most {max_items} {field} per request, got {count}; split the request",
            kind="too_long",
        )
    for loc, text in texts:
        if len(text) > max_chars:
            raise InvalidInput(
                list(loc), f"text of {len(text)} characters exceeds the limit of {max_chars}", kind="string_too_long"
            )


def texts_of(source: Any, loc: Loc) -> Iterator[tuple[list[str | int], str]]:
    """(path in the body, text) for every string in ``source``: a string, a mapping or a list of them."""
    if isinstance(source, str):
        yield list(loc), source
    elif isinstance(source, Mapping):
        for key, value in source.items():
            yield from texts_of(value, [*loc, key])
    elif isinstance(source, list):
        for index, value in enumerate(source):
            yield from texts_of(value, [*loc, index])


class ScoringService:
    """What every protocol's route calls: everything between a validated body and the numbers it answers with.

    It owns admission (a request counts as accepted until answered, and is refused while loading or draining), the
    per-request limits, normalization, splitting preference pairs into items, and watching for the client going
    away, so that a protocol is only its schema and the translation to and from :class:`Item` s.
    """

    def __init__(
        self, served: Served, lifecycle: Lifecycle, settings: ServeSettings, telemetry: RewardTelemetry | None = None
    ):
        self.served = served
        self.lifecycle = lifecycle
        self.settings = settings
        self.telemetry = telemetry  # told every delivered score (service/telemetry.py)

    @property
    def model(self) -> ModelInfo:
        """The served model (or combination) the answers name."""
        return self.served.model

    async def score(
        self,
        request: Request,
        items: Sequence[Item],
        *,
        field: str,
        normalize_scores: bool = False,
        component: str | None = None,
    ) -> Scored:
        """Scores for ``items`` in order; ``field`` names the body field that holds them (for the item cap);
        ``component``: one of several models alone, instead of their combination.

        An empty ``items`` is answered without touching the model (some clients shard a batch over replicas and
        send a replica an empty share).
        """
        started = time.monotonic()
        with self.lifecycle.admit():
            self._check(field, len(items), items)
            self._check_normalize(normalize_scores)
            if not items:
                return self.served.empty() if component is None else Scored([], [], [])
            payloads, locs = [i.payload for i in items], [i.loc for i in items]
            scored = await self._score(request, payloads, locs, started, component)
            if normalize_scores:
                stats = self.model.normalization
                scored = Scored([normalize(x, stats) for x in scored.scores], scored.truncated, scored.tokens)
            return scored

    async def compare(self, request: Request, pairs: Sequence[Item], *, field: str = "pairs") -> PairScores:
        """r(chosen) and r(rejected) for each preference row (``payload``: ``prompt``?, ``chosen``, ``rejected``)."""
        started = time.monotonic()
        with self.lifecycle.admit():
            self._check(field, len(pairs), pairs)
            payloads, locs = [], []
            for pair in pairs:
                try:
                    payloads += [pair_side(pair.payload, "chosen"), pair_side(pair.payload, "rejected")]
                except FormattingError as exc:
                    raise InvalidInput(list(pair.loc), str(exc)) from exc
                locs += [[*pair.loc, "chosen"], [*pair.loc, "rejected"]]
            scored = await self._score(request, payloads, locs, started)
            return PairScores(
                scored.scores[0::2],
                scored.scores[1::2],
                {name: PairScores(s.scores[0::2], s.scores[1::2]) for name, s in scored.components.items()},
            )

    def _check_normalize(self, normalize_scores: bool) -> None:
        if not normalize_scores:
            return
        if self.served.several:
            raise InvalidInput(
                ["body", "normalize"],
                "several reward models are served combined: start the service with --combine-scores normalized to "
                "combine their normalized scores",
            )
        if not self.model.normalization:
            raise InvalidInput(["body", "normalize"], "this model has no normalization statistics in its manifest")

    def _check(self, field: str, count: int, items: Sequence[Item]) -> None:
        s = self.settings
        texts = (pair for item in items for pair in texts_of(item.source, item.loc))
        check_limits(field, count, texts, max_items=s.max_items_per_request, max_chars=s.max_text_chars)

    async def _score(
        self,
        request: Request,
        payloads: Sequence[Mapping[str, Any]],
        locs: Sequence[Loc],
        started: float,
        component: str | None = None,
    ) -> Scored:
        one = self.served.component(component) if component is not None else None
        scorer = one.engine.scorer if one is not None else self.served.scorer
        scored = await scorer.run(payloads, locs=locs, started=started, wait_for_disconnect=_disconnect_of(request))
        if self.telemetry is not None:
            for model, part in [(one.info, scored)] if one is not None else self.served.parts(scored):
                self.telemetry.observe(model, part)
        return scored


def _disconnect_of(request: Request) -> WaitForDisconnect:
    """A coroutine function that returns once the client has gone away."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait_for_disconnect
