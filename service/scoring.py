"""The scoring path shared by every route: check limits, tokenize, queue, wait, split.

route -> validate (schemas) -> :func:`check_limits` -> :meth:`Scorer.score`: tokenize (a small request on the event
loop, a larger one in a worker thread) -> :meth:`Batcher.submit` -> wait for the future (bounded by the request
timeout, abandoned if the client goes away) -> scores in item order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from service.backend import ItemEncoder
from service.batching import Batcher, BatcherClosed, ForwardFailed, QueueFull, RequestTooLarge
from service.errors import ClientGone, InvalidInput, Overloaded, PayloadTooLarge, ScoringFailed, TimedOut, Unavailable
from training.formatting import Encoded, FormattingError

try:  # transformers renders chat templates with jinja2 (installed with torch)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover - then no chat template can be rendered at all

    class TemplateError(Exception):  # type: ignore[no-redef]
        pass


WaitForDisconnect = Callable[[], Awaitable[None]]

# Requests with at most this many characters of text are tokenized on the event loop (~1.4 ms for 4,096 characters
# on the 2-core CPU): the hop to a worker thread and back costs more than that for one short text, and a third
# runnable thread preempts the inference workers more often (docs/benchmarks.md). Longer requests go to a thread.
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    truncated: list[bool]


def check_limits(
    field: str, count: int, texts: Iterable[tuple[int, str, str]], *, max_items: int, max_chars: int
) -> None:
    """422 for too many items or a text over the character cap; ``texts`` yields (index, sub-path, text)."""
    if count > max_items:
        raise InvalidInput(
            ["body", field],
            f"at most {max_items} {field} per request, got {count}; split the request",
            kind="too_long",
        )
    for index, path, text in texts:
        if len(text) > max_chars:
            raise InvalidInput(
                ["body", field, index, *_split_path(path)],
                f"text of {len(text)} characters exceeds the limit of {max_chars}",
                kind="string_too_long",
            )


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


def _split_path(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in path.split(".") if p]


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
        return Scored(scores, [e.truncated for e in encoded])

    def _encode(self, items: Sequence[Mapping[str, Any]], locs: Sequence[Sequence[str | int]]) -> list[Encoded]:
        out = []
        for item, loc in zip(items, locs):
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
