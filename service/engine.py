"""The engine: the loaded model and what serves it (backend, batcher, scorer, thread plan, batch limits).

Loading builds one :class:`Engine` (:func:`build_engine`) and the runtime publishes it once, before the service
turns ready; nothing in it changes afterwards, so nothing that reads it checks for a half-loaded service.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    # several models served combined: each one's own (``scores`` is then the combination, ``truncated`` by any)
    components: dict[str, Scored] = field(default_factory=dict)


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
    """The engine's way in (:meth:`run`): tokenize items, queue their token ids, wait for their scores. The steps
    are also offered apart (:meth:`encode`, :meth:`submit`, :func:`wait_all`), so that several engines can share one
    tokenization and compute at once (:mod:`service.combined`)."""

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
        encoded = await self.encode(items, locs)
        future = self.submit(encoded, deadline)
        [scores] = await wait_all([future], deadline, wait_for_disconnect, self.request_timeout_s)
        return scored_as(encoded, scores)

    async def encode(self, items: Sequence[Mapping[str, Any]], locs: Sequence[Sequence[str | int]]) -> list[Encoded]:
        """The items' token ids (a small request on the event loop, a larger one in a worker thread)."""
        if _characters_within(items, self.inline_chars):
            return self._encode(items, locs)
        return await anyio.to_thread.run_sync(self._encode, items, locs)

    def submit(self, encoded: Sequence[Encoded], deadline: float) -> asyncio.Future:
        """Queue the token ids; the future gets their scores. Refusals as the service's errors."""
        try:
            return self.batcher.submit([e.input_ids for e in encoded], budget_s=deadline - time.monotonic())
        except QueueFull as exc:
            raise Overloaded(str(exc), exc.retry_after_s) from exc
        except RequestTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except BatcherClosed as exc:
            raise Unavailable(str(exc)) from exc

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


def scored_as(encoded: Sequence[Encoded], scores: list[float]) -> Scored:
    return Scored(scores, [e.truncated for e in encoded], [len(e.input_ids) for e in encoded])


async def wait_all(
    futures: Sequence[asyncio.Future],
    deadline: float,
    wait_for_disconnect: WaitForDisconnect | None,
    timeout_s: float,
) -> list[list[float]]:
    """Every future's scores, in order, by ``deadline``. The first forward that fails, the client going away or the
    deadline ends the wait with the service's error, and the futures still waiting are cancelled (their items
    still in a queue are dropped, not computed)."""
    watcher = asyncio.ensure_future(wait_for_disconnect()) if wait_for_disconnect is not None else None
    pending = set(futures)
    try:
        while pending:
            waiting = pending | ({watcher} if watcher is not None else set())
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            for future in pending & done:
                try:
                    future.result()
                except ForwardFailed as exc:
                    raise ScoringFailed(str(exc)) from exc
                except BatcherClosed as exc:  # refused by a drain that could not finish it in time
                    raise Unavailable(f"{exc}; use another replica") from exc
            pending -= done
            if not pending:
                break
            if watcher is not None and watcher in done:
                raise ClientGone("the client disconnected before its scores were ready")
            if not done:
                raise TimedOut(f"not scored within the request timeout of {timeout_s:g} s")
        return [future.result() for future in futures]
    finally:
        for future in futures:
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
    encoding: str = ""  # engines with the same key turn an item into the same token ids (see encoding_key)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info


def encoding_key(encoder: ItemEncoder) -> str:
    """What decides an item's token ids: the formatting recipe (chat template included) and the tokenizer (a hash
    of its full definition: vocabulary, merges, normalizer, special tokens). An encoder whose tokenizer cannot be
    written out gets a key of its own."""
    recipe = getattr(encoder, "recipe", None)
    tokenizer = getattr(getattr(encoder, "tokenizer", None), "backend_tokenizer", None)
    if recipe is None or tokenizer is None:
        return f"object:{id(encoder)}"
    digest = hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True, default=str).encode())
    digest.update(tokenizer.to_str().encode())
    return digest.hexdigest()


def batch_limits(settings: ServeSettings, backend: ScoringBackend | None = None) -> BatchLimits:
    """The batcher's limits from the settings; the default token budget depends on the model's device and dtype,
    the default window on whether the backend pads its batches (without a backend: the settings', padded)."""
    s = settings
    device, dtype = (backend.info.device, backend.info.dtype) if backend is not None else (s.device, s.dtype)
    # First come, first served when nothing is padded (a text's wait then depends only on its arrival); grouping
    # by length where batches are padded.
    pads = getattr(backend, "pads_batches", True)
    default_window = 1 if not pads else 0
    return BatchLimits(
        s.batch_tokens_for(device, dtype),
        s.max_batch_size,
        s.max_wait_ms / 1000.0,
        s.max_queue_tokens,
        s.batch_overhead_tokens,
        s.batch_window_items if s.batch_window_items is not None else default_window,
        BLOCK_TOKENS if getattr(backend, "shares_prefixes", False) else 0,  # keep prefix groups together
        pads,
    )


def build_engine(
    settings: ServeSettings, backend: ScoringBackend | None, observer: BatchObserver, path: str | None = None
) -> Engine:
    """Plan the threads, load the checkpoint at ``path`` (default: the one --model; unless ``backend`` is given),
    warm it up, start the batcher."""
    from training.checkpoint import resolve_device

    s = settings
    threads = plan_threads(resolve_device(s.device), s.inference_workers, s.torch_threads)
    threads.apply()  # loading and warm-up run as each worker will
    if backend is None:
        path = path if path is not None else s.components[0][1]
        logger.info("loading reward model from %s (dtype %s, device %s)", path, s.dtype, s.device)
        backend = CheckpointBackend.load(
            path,
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
    return Engine(backend, batcher, scorer, threads, limits, encoding_key(backend.formatter))
