"""What is served: one reward model as it is, or several combined into one reward (``--model NAME=PATH`` repeated,
``--combine``).

Every component is an :class:`~service.engine.Engine` of its own (manifest, formatting recipe, tokenizer, backend,
batcher and inference workers). :class:`Combined` has the :class:`~service.engine.Scorer`'s ``run`` contract, so
the scoring service and the routes do not depend on how many models there are: it tokenizes a request once per
distinct (recipe, tokenizer), queues the token ids on every component's batcher before waiting for any (they
compute at once), waits for them all under one deadline and one disconnect watch, and combines the scores.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from service.backend import ModelInfo, ScoringBackend
from service.batching import BatchObserver
from service.combination import Combination, combined_version
from service.engine import Engine, Scored, Scorer, WaitForDisconnect, build_engine, scored_as, wait_all
from service.errors import InvalidInput
from service.settings import ServeSettings
from training.checkpoint import normalize
from training.formatting import Encoded

logger = logging.getLogger("reward.service")


class ComponentFailed(RuntimeError):
    """A component could not be loaded; the message names it."""


@dataclass(frozen=True)
class Component:
    name: str
    engine: Engine

    @functools.cached_property
    def info(self) -> ModelInfo:
        """The engine's model as served here: named by the component (telemetry, /classify, /v1/models)."""
        return replace(self.engine.info, name=self.name)


class Combined:
    """Scores items with every component and combines them as declared."""

    def __init__(self, components: Sequence[Component], combination: Combination, request_timeout_s: float):
        self.components = tuple(components)
        self.combination = combination
        self.request_timeout_s = request_timeout_s
        groups: dict[str, list[Component]] = {}
        for component in self.components:
            groups.setdefault(component.engine.encoding or component.name, []).append(component)
        self.groups = tuple(tuple(group) for group in groups.values())  # components that share one tokenization

    async def run(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        locs: Sequence[Sequence[str | int]],
        started: float | None = None,
        wait_for_disconnect: WaitForDisconnect | None = None,
    ) -> Scored:
        deadline = (started if started is not None else time.monotonic()) + self.request_timeout_s
        encodings = [await _encode(group, items, locs) for group in self.groups]
        futures, order = [], []
        try:
            for encoded, group in zip(encodings, self.groups, strict=True):
                for component in group:
                    futures.append(component.engine.scorer.submit(encoded, deadline))
                    order.append((component.name, encoded))
        except BaseException:
            for future in futures:
                future.cancel()  # what was queued already is dropped, not computed
            raise
        results = await wait_all(futures, deadline, wait_for_disconnect, self.request_timeout_s)
        parts = {name: scored_as(encoded, scores) for (name, encoded), scores in zip(order, results, strict=True)}
        return self.combine({c.name: parts[c.name] for c in self.components})

    def combine(self, parts: Mapping[str, Scored]) -> Scored:
        """The declared combination of the components' scores, item by item."""
        inputs = dict(parts)
        if self.combination.scores == "normalized":
            stats = {c.name: c.info.normalization for c in self.components}
            inputs = {
                name: Scored([normalize(x, stats[name]) if stats[name] else x for x in s.scores], s.truncated, s.tokens)
                for name, s in parts.items()
            }
        count = len(next(iter(parts.values())).scores)
        scores = [self.combination.apply({n: s.scores[i] for n, s in inputs.items()}) for i in range(count)]
        truncated = [any(s.truncated[i] for s in parts.values()) for i in range(count)]
        tokens = [max(s.tokens[i] for s in parts.values()) for i in range(count)]
        return Scored(scores, truncated, tokens, dict(parts))


async def _encode(
    group: Sequence[Component], items: Sequence[Mapping[str, Any]], locs: Sequence[Sequence[str | int]]
) -> list[Encoded]:
    """The items' token ids for a group of components; a 422 says which models could not take an item."""
    try:
        return await group[0].engine.scorer.encode(items, locs)
    except InvalidInput as exc:
        names = ", ".join(f"'{c.name}'" for c in group)
        raise InvalidInput(exc.loc, f"model {names}: {exc.message}", kind=exc.error_type) from exc


@dataclass(frozen=True)
class Served:
    """The engines published once before readiness, and how a request is scored with them."""

    components: tuple[Component, ...]
    combination: Combination | None  # None: one model, served as it is
    scorer: Scorer | Combined  # the one model's own scorer, or the combination's
    model: ModelInfo  # what the answers name: the one model, or the combination (name "a+b", its own version)

    @property
    def several(self) -> bool:
        return self.combination is not None

    @property
    def engines(self) -> list[Engine]:
        return [c.engine for c in self.components]

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def parts(self, scored: Scored) -> list[tuple[ModelInfo, Scored]]:
        """Each component's model and scores, for telemetry."""
        if scored.components:
            return [(c.info, scored.components[c.name]) for c in self.components if c.name in scored.components]
        return [(self.model, scored)]

    def empty(self) -> Scored:
        """The answer to no items (keeps the component keys)."""
        if not self.several:
            return Scored([], [], [])
        return Scored([], [], [], {c.name: Scored([], [], []) for c in self.components})


def serve(components: Sequence[Component], combination: Combination | None, request_timeout_s: float) -> Served:
    """What to publish for these loaded components."""
    if combination is None:
        [one] = components
        return Served(tuple(components), None, one.engine.scorer, one.info)
    _check_normalization(components, combination)
    infos = [c.engine.info for c in components]
    model = ModelInfo(
        name="+".join(c.name for c in components),
        version=combined_version({c.name: c.engine.info.version for c in components}, combination),
        source=",".join(i.source for i in infos),
        dtype=",".join(dict.fromkeys(i.dtype for i in infos)),
        device=",".join(dict.fromkeys(i.device for i in infos)),
        has_manifest=all(i.has_manifest for i in infos),
        reward_label=None,
        formatting={},
        normalization=None,
    )
    return Served(tuple(components), combination, Combined(components, combination, request_timeout_s), model)


def _check_normalization(components: Sequence[Component], combination: Combination) -> None:
    if combination.scores != "normalized":
        return
    missing = [c for c in components if combination.weights.get(c.name) and not c.engine.info.normalization]
    if missing:
        named = ", ".join(f"'{c.name}' ({c.engine.info.source})" for c in missing)
        raise ComponentFailed(
            f"--combine-scores normalized: component {named} has no normalization statistics in its manifest"
        )


def build_served(settings: ServeSettings, backend: ScoringBackend | None, observer: BatchObserver) -> Served:
    """Load every component in order (``backend``: a ready-made one for a single model). If one fails, the batchers
    already started are stopped and :class:`ComponentFailed` names the one that failed."""
    combination = settings.combination
    components: list[Component] = []
    try:
        for name, path in settings.components:
            try:
                engine = build_engine(settings, backend, observer, path)
            except Exception as exc:
                if combination is None:
                    raise
                raise ComponentFailed(f"component '{name}' ({path}): {exc.__class__.__name__}: {exc}") from exc
            components.append(Component(name or engine.info.name, engine))
        served = serve(components, combination, settings.request_timeout_s)
    except BaseException:
        for component in components:
            component.engine.batcher.stop(timeout=1.0)
        raise
    if combination is not None:
        unweighted = [name for name, weight in combination.weights.items() if not weight]
        if unweighted:
            logger.info("components with weight 0 in the combination (served alone by /classify): %s", unweighted)
    return served
