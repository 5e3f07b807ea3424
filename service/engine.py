"""The engine: the loaded model and what serves it (backend, batcher, scorer, thread plan, batch limits).

Loading builds one :class:`Engine` (:func:`build_engine`) and the runtime publishes it once, before the service
turns ready; nothing in it changes afterwards, so nothing that reads it checks for a half-loaded service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from service.backend import CheckpointBackend, ItemEncoder, ModelInfo, ScoringBackend, ThreadPlan, plan_threads
from service.batching import (
    Batcher,
    BatcherClosed,
    BatchLimits,
    BatchObserver,
    ForwardFailed,
    QueueFull,
    RequestTooLarge,
)
from service.errors import ClientGone, InvalidInput, Overloaded, PayloadTooLarge, ScoringFailed, TimedOut, Unavailable
from service.prefix import BLOCK_TOKENS
from service.settings import ServeSettings
from training.formatting import Encoded, FormattingError

logger = logging.getLogger("reward.service")

WaitForDisconnect = Callable[[], Awaitable[None]]

# Requests with at most this many characters of text are tokenized on the event loop: for a short text the hop to a
# worker thread and back costs more than tokenizing, and a third runnable thread preempts the inference workers
# more often (docs/benchmarks.md). Longer requests go to a thread, so they never stall the loop.
INLINE_TOKENIZE_CHARS = 4096

try:  # transformers renders chat templates with jinja2 (installed with torch)
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover - then no chat template can be rendered at all

    class TemplateError(Exception):  # type: ignore[no-redef]
        pass


@dataclass(frozen=True)
class Scored:
    scores: list[float]
    truncated: list[bool]
    tokens: list[int]  # each item's token count once formatted (and truncated)


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
    """The engine's way in (:meth:`run`): tokenize items, queue their token ids, wait for their scores."""

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

    async def run(
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
            future = self.batcher.submit([e.input_ids for e in encoded], budget_s=deadline - time.monotonic())
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
                except BatcherClosed as exc:  # refused by a drain that could not finish it in time
                    raise Unavailable(f"{exc}; use another replica") from exc
            if watcher is not None and watcher in done:
                raise ClientGone("the client disconnected before its scores were ready")
            raise TimedOut(f"not scored within the request timeout of {self.request_timeout_s:g} s")
        finally:
            if not future.done():
                future.cancel()  # its items still waiting in the queue are dropped, not computed
            if watcher is not None and not watcher.done():
                watcher.cancel()


@dataclass(frozen=True)
class Engine:
    backend: ScoringBackend
    batcher: Batcher
    scorer: Scorer
    threads: ThreadPlan  # inference workers and their torch threads
    limits: BatchLimits

    @property
    def info(self) -> ModelInfo:
        return self.backend.info


def batch_limits(settings: ServeSettings, backend: ScoringBackend | None = None) -> BatchLimits:
    """The batcher's limits from the settings; the default token budget depends on the model's device and dtype,
    the default window on whether the backend pads its batches (without a backend: the settings', padded)."""
    s = settings
    device, dtype = (backend.info.device, backend.info.dtype) if backend is not None else (s.device, s.dtype)
    # First come, first served when nothing is padded (a text's wait then depends only on its arrival); grouping
    # by length where batches are padded.
    default_window = 1 if not getattr(backend, "pads_batches", True) else 0
    return BatchLimits(
        s.batch_tokens_for(device, dtype),
        s.max_batch_size,
        s.max_wait_ms / 1000.0,
        s.max_queue_tokens,
        s.batch_overhead_tokens,
        s.batch_window_items if s.batch_window_items is not None else default_window,
        BLOCK_TOKENS if getattr(backend, "shares_prefixes", False) else 0,  # keep prefix groups together
    )


def build_engine(settings: ServeSettings, backend: ScoringBackend | None, observer: BatchObserver) -> Engine:
    """Plan the threads, load the checkpoint (unless ``backend`` is given), warm it up, start the batcher."""
    from training.checkpoint import resolve_device

    s = settings
    threads = plan_threads(resolve_device(s.device), s.inference_workers, s.torch_threads)
    threads.apply()  # loading and warm-up run as each worker will
    if backend is None:
        logger.info("loading reward model from %s (dtype %s, device %s)", s.model, s.dtype, s.device)
        backend = CheckpointBackend.load(
            s.model,
            dtype=s.dtype,
            device=s.device,
            reward_label=s.reward_label,
            max_length=s.max_length,
            truncation_side=s.truncation_side,
            backend=s.backend,
            prefix_cache_mb=s.prefix_cache_mb,
        )
    backend.warm_up()
    limits = batch_limits(s, backend)
    batcher = Batcher(
        backend.forward, limits, observer=observer, workers=threads.workers, on_worker_start=threads.apply
    ).start()
    scorer = Scorer(backend.formatter, batcher, request_timeout_s=s.request_timeout_s)
    return Engine(backend, batcher, scorer, threads, limits)
