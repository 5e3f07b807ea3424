"""The scoring path shared by every protocol: admit, check limits, tokenize, queue, wait, split.

A protocol's route validates its body (its own schema), turns it into :class:`Item` s and hands them to the
:class:`ScoringService`: admission (:meth:`Lifecycle.admit`) -> :func:`check_limits` -> :meth:`Scorer.score`:
tokenize (a small request on the event loop, a larger one in a worker thread) -> :meth:`Batcher.submit` -> wait for
the future (bounded by the request timeout, abandoned if the client goes away) -> scores in item order.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from service.backend import ItemEncoder
from service.batching import Batcher, BatcherClosed, ForwardFailed, QueueFull, RequestTooLarge
from service.errors import ClientGone, InvalidInput, Overloaded, PayloadTooLarge, ScoringFailed, TimedOut, Unavailable
from training.checkpoint import normalize
from training.formatting import Encoded, FormattingError, pair_side

if TYPE_CHECKING:
    from starlette.requests import Request

    from service.backend import ModelInfo
    from service.runtime import ServiceRuntime

try:  # transformers renders chat templates with jinja2 (installed with torch)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover - then no chat template can be rendered at all

    class TemplateError(Exception):  # type: ignore[no-redef]
        pass


WaitForDisconnect = Callable[[], Awaitable[None]]

# Requests with at most this many characters of text are tokenized on the event loop: for a short text the hop to a
# worker thread and back costs more than tokenizing, and a third runnable thread preempts the inference workers
# more often (docs/benchmarks.md). Longer requests go to a thread, so they never stall the loop.
INLINE_TOKENIZE_CHARS = 4096


Loc = Sequence[str | int]


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    truncated: list[bool]
    tokens: list[int]  # each item's token count once formatted (and truncated)


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
class Comparison:
    chosen: list[float]
    rejected: list[float]

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


def _characters_within(items: Sequence[Mapping[str, Any]], limit: int) -> bool:
    """Whether the items' text fields (``text``, ``prompt``, ``response``, message contents) hold ≤ ``limit`` chars."""
    total = 0
    for item in items:
        for value in item.values():
            if isinstance(value, str):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(m.get("content") or "") for m in value if isinstance(m, Mapping))
            if total > limit:
                return False
    return True


class Scorer:
    def __init__(
        self,
        encoder: ItemEncoder,
        batcher: Batcher,
        *,
        request_timeout_s: float,
        inline_chars: int = INLINE_TOKENIZE_CHARS,
    ):
        self.encoder = encoder
        self.batcher = batcher
        self.request_timeout_s = request_timeout_s
        self.inline_chars = inline_chars

    async def score(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        locs: Sequence[Sequence[str | int]],
        started: float | None = None,
        wait_for_disconnect: WaitForDisconnect | None = None,
    ) -> Scored:
        """Scores for ``items`` in order. ``locs[i]`` names item i in error messages (``["body", "items", 3]``)."""
        deadline = (started if started is not None else time.monotonic()) + self.request_timeout_s
        if _characters_within(items, self.inline_chars):
            encoded = self._encode(items, locs)
        else:
            encoded = await anyio.to_thread.run_sync(self._encode, items, locs)
        try:
            future = self.batcher.submit([e.input_ids for e in encoded])
        except QueueFull as exc:
            raise Overloaded(str(exc), exc.retry_after_s) from exc
        except RequestTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except BatcherClosed as exc:
            raise Unavailable(str(exc)) from exc
        scores = await self._wait(future, deadline, wait_for_disconnect)
        return Scored(scores, [e.truncated for e in encoded], [len(e.input_ids) for e in encoded])

    def _encode(self, items: Sequence[Mapping[str, Any]], locs: Sequence[Sequence[str | int]]) -> list[Encoded]:
        out = []
        for item, loc in zip(items, locs, strict=True):
            try:
                encoded = self.encoder.encode(item)
            except FormattingError as exc:
                raise InvalidInput(list(loc), str(exc)) from exc
            except TemplateError as exc:  # e.g. raise_exception('roles must alternate') in the model's template
                raise InvalidInput(list(loc), f"the model's chat template refused these messages: {exc}") from exc
            if not encoded.input_ids:  # e.g. a template that renders nothing for these roles: nothing to score
                raise InvalidInput(list(loc), "the item has no tokens once formatted for this model; nothing to score")
            out.append(encoded)
        return out

    async def _wait(
        self, future: asyncio.Future, deadline: float, wait_for_disconnect: WaitForDisconnect | None
    ) -> list[float]:
        watcher = asyncio.ensure_future(wait_for_disconnect()) if wait_for_disconnect is not None else None
        try:
            waiting = {future} | ({watcher} if watcher is not None else set())
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if future in done:
                try:
                    return future.result()
                except ForwardFailed as exc:
                    raise ScoringFailed(str(exc)) from exc
            if watcher is not None and watcher in done:
                raise ClientGone("the client disconnected before its scores were ready")
            raise TimedOut(f"not scored within the request timeout of {self.request_timeout_s:g} s")
        finally:
            if not future.done():
                future.cancel()  # its items still waiting in the queue are dropped, not computed
            if watcher is not None and not watcher.done():
                watcher.cancel()


class ScoringService:
    """What every protocol's route calls: everything between a validated body and the numbers it answers with.

    It owns admission (a request counts as accepted until answered, and is refused while loading or draining), the
    per-request limits, normalization, splitting preference pairs into items, and watching for the client going
    away, so that a protocol is only its schema and the translation to and from :class:`Item` s.
    """

    def __init__(self, runtime: ServiceRuntime):
        self.runtime = runtime

    @property
    def model(self) -> ModelInfo:
        return self.runtime.info

    async def score(
        self, request: Request, items: Sequence[Item], *, field: str, normalize_scores: bool = False
    ) -> Scored:
        """Scores for ``items`` in order; ``field`` names the body field that holds them (for the item cap).

        An empty ``items`` is answered without touching the model (some clients shard a batch over replicas and
        send a replica an empty share).
        """
        started = time.monotonic()
        runtime = self.runtime
        with runtime.lifecycle.admit():
            self._check(field, len(items), items)
            if normalize_scores and not self.model.normalization:
                raise InvalidInput(["body", "normalize"], "this model has no normalization statistics in its manifest")
            if not items:
                return Scored([], [], [])
            scored = await self._score(request, [i.payload for i in items], [i.loc for i in items], started)
            if normalize_scores:
                stats = self.model.normalization
                scored = Scored([normalize(x, stats) for x in scored.scores], scored.truncated, scored.tokens)
            return scored

    async def compare(self, request: Request, pairs: Sequence[Item], *, field: str = "pairs") -> Comparison:
        """r(chosen) and r(rejected) for each preference row (``payload``: ``prompt``?, ``chosen``, ``rejected``)."""
        started = time.monotonic()
        with self.runtime.lifecycle.admit():
            self._check(field, len(pairs), pairs)
            payloads, locs = [], []
            for pair in pairs:
                try:
                    payloads += [pair_side(pair.payload, "chosen"), pair_side(pair.payload, "rejected")]
                except FormattingError as exc:
                    raise InvalidInput(list(pair.loc), str(exc)) from exc
                locs += [[*pair.loc, "chosen"], [*pair.loc, "rejected"]]
            scored = await self._score(request, payloads, locs, started)
            return Comparison(scored.scores[0::2], scored.scores[1::2])

    def _check(self, field: str, count: int, items: Sequence[Item]) -> None:
        s = self.runtime.settings
        texts = (pair for item in items for pair in texts_of(item.source, item.loc))
        check_limits(field, count, texts, max_items=s.max_items_per_request, max_chars=s.max_text_chars)

    async def _score(
        self, request: Request, payloads: Sequence[Mapping[str, Any]], locs: Sequence[Loc], started: float
    ) -> Scored:
        scorer = self.runtime.scorer
        if scorer is None:  # admitted means ready, and ready means loaded; kept for type checkers
            raise Unavailable("the model is still loading", retry_after_s=5)
        return await scorer.score(payloads, locs=locs, started=started, wait_for_disconnect=_disconnect_of(request))


def _disconnect_of(request: Request) -> WaitForDisconnect:
    """A coroutine function that returns once the client has gone away."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait_for_disconnect
