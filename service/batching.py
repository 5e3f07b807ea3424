"""Cross-request batching: token ids in, one forward pass over many requests' items, scores back.

The contract is small, as in text-embeddings-inference's ``queue.rs``: a request hands :meth:`Batcher.submit` its
items' token ids and gets an asyncio future; an inference worker thread takes items from the queue in batches and
calls ``forward(list of token-id lists) -> list of floats``; each request's future receives its scores in order.
The batcher knows nothing of HTTP or of the model.

There may be several workers (``workers``), each forming and computing its own batches from the one queue: on a
CPU two forwards with half the threads each outrun one forward with all of them, and a thread of the HTTP side that
preempts one of them stalls only that one (see ``docs/benchmarks.md``).

How a batch is formed:

- it always contains the oldest waiting item, so no item waits behind a stream of others (shortest-first batching
  starved long texts);
- around it, items of similar length are added (the waiting items sorted by length, the neighbour that adds the
  least padding first) while ``padded tokens = longest x count`` stays within ``max_batch_tokens``, the count
  within ``max_batch_size``, and each addition raises ``real tokens / (overhead_tokens + padded tokens)``: with
  a forward's fixed cost expressed as ``overhead_tokens``, an item that would add more padding than it saves in
  per-forward cost is left for a later batch of its own length;
- with ``window_items`` set, the neighbours are chosen among the ``window_items`` oldest waiting items only: an item
  is then overtaken by at most that many later arrivals, which bounds the latency tail under many one-text clients
  (each chosen by length from the whole queue, an item of an uncommon length waits until it is the oldest of all);
- with ``group_prefix_tokens`` set (a decoder backend that computes shared prompt prefixes once), the oldest item
  with its prefix siblings (the rest of its GRPO group), then the next oldest with its own, ... while the tokens
  computed (:func:`group_cost`) fit ``max_batch_tokens``; an oldest item without siblings goes by length as above;
- when the queue is short, a worker waits up to ``max_wait`` (from the oldest item's arrival) for more;
- items of a request that is gone (its future cancelled: timeout, client disconnect) are skipped, never computed.

A forward that raises fails the requests of that batch only (their futures get :class:`ForwardFailed`); a forward
that raises :class:`BatchTooLarge` (out of memory) is retried in halves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.prefix import common_prefix

logger = logging.getLogger("reward.batching")

Forward = Callable[[list[list[int]]], list[float]]


# -- errors ------------------------------------------------------------------------------------------------------
class BatchingError(Exception):
    """Base of the errors a submitted request can meet in the batcher."""


class QueueFull(BatchingError):
    """Admitting the request would push the waiting tokens past ``max_queue_tokens``; try again later."""

    def __init__(self, queued_tokens: int, limit: int, retry_after_s: int):
        super().__init__(f"the queue is full ({queued_tokens} of {limit} tokens waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class WouldTimeOut(QueueFull):
    """At the measured speed, the tokens queued ahead and the request's own would not be scored by its deadline:
    refused at once (429 + Retry-After) rather than accepted, computed in part and answered with a 504."""

    def __init__(self, wait_s: float, budget_s: float, retry_after_s: int):
        BatchingError.__init__(
            self,
            f"the queue would take about {wait_s:.0f} s to score this request, more than the {budget_s:.0f} s left "
            f"before its timeout; retry in {retry_after_s} s",
        )
        self.retry_after_s = retry_after_s


class RequestTooLarge(BatchingError):
    """The request alone holds more tokens than the queue may ever hold."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the request holds {tokens} tokens, more than the queue limit of {limit}; split it")


class BatcherClosed(BatchingError):
    """The batcher is stopping and takes no new work."""


class ForwardFailed(BatchingError):
    """The forward pass over the batch holding this request's items raised."""

    def __init__(self, cause: BaseException):
        super().__init__(f"the forward pass failed: {cause.__class__.__name__}: {cause}")
        self.cause = cause


class BatchTooLarge(Exception):
    """Raised by ``forward`` when a batch does not fit (e.g. CUDA out of memory): the batcher retries it in halves."""


# -- configuration and observation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 2048
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_queue_tokens: int = 262_144
    overhead_tokens: int = 0  # a forward's fixed cost in tokens: a batch stops growing when padding costs more
    window_items: int = 0  # neighbours come from this many oldest waiting items; 0: from all of them
    group_prefix_tokens: int = 0  # items sharing this many leading tokens go together (prefix sharing); 0: off
    pads: bool = True  # the forward pads a group's suffixes to the longest; False: it computes each one's tokens only


@dataclass(frozen=True)
class BatchReport:
    """What one forward pass did, for metrics."""

    items: int
    padded_tokens: int
    real_tokens: int
    queue_waits_s: list[float]
    forward_s: float
    ok: bool


class BatchObserver(Protocol):
    def batch_done(self, report: BatchReport) -> None: ...


# -- internals ---------------------------------------------------------------------------------------------------
class _Job:
    """One submitted request: the worker fills its scores, the future gets them once all are in."""

    __slots__ = ("future", "loop", "scores", "remaining", "closed", "queued_tokens", "queued_items")

    # Every field but ``future`` and ``loop`` is read and written under the batcher's lock.

    def __init__(self, future: asyncio.Future, loop: asyncio.AbstractEventLoop, count: int, tokens: int):
        self.future = future
        self.loop = loop
        self.scores: list[float] = [math.nan] * count
        self.remaining = count
        self.closed = False  # set under the batcher lock: finished, failed or abandoned
        self.queued_tokens = tokens  # tokens of this job still waiting in the queue (under the lock)
        self.queued_items = count


@dataclass(eq=False)
class _Entry:
    job: _Job
    index: int
    ids: list[int]
    enqueued_at: float
    seq: int

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def abandoned(self) -> bool:
        return self.job.closed


def _settle(future: asyncio.Future, result: list[float] | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Waiting(Protocol):
    """What :func:`select_batch` needs of a waiting item."""

    @property
    def length(self) -> int: ...

    @property
    def abandoned(self) -> bool: ...

    @property
    def ids(self) -> Sequence[int]: ...  # read only with ``group_prefix_tokens``


def select_batch(waiting: Sequence[Waiting], limits: BatchLimits) -> list[int]:
    """The next batch: indices into ``waiting`` (oldest first), ordered by length. Empty when nothing is live.

    The oldest live item is always in it; around it, in the live items sorted by (length, age), the neighbour that
    adds the least padding is taken first, while ``longest x count <= max_batch_tokens``, ``count <=
    max_batch_size`` and, with ``overhead_tokens``, each addition raises ``real / (overhead + padded)`` tokens.
    With ``window_items``, the neighbours come from that many oldest live items only. With ``group_prefix_tokens``
    and prefix siblings of the oldest item waiting, whole groups are taken instead, oldest first (see
    :func:`select_groups`). Abandoned items are never chosen. A pure function of its arguments: no clock, no lock,
    no state.
    """
    live = [i for i, item in enumerate(waiting) if not item.abandoned]
    if not live:
        return []
    if limits.group_prefix_tokens > 0:
        grouped = select_groups(waiting, live, limits)
        if grouped is not None:
            return grouped
    oldest = live[0]
    window = limits.window_items  # with a window, neighbours come from the oldest live items only
    by_length = sorted(live[:window] if window else live, key=lambda i: (waiting[i].length, i))
    lengths = [waiting[i].length for i in by_length]
    lo = hi = by_length.index(oldest)
    width = lengths[lo]
    count = 1
    real = width
    max_tokens, max_size, overhead = limits.max_batch_tokens, limits.max_batch_size, limits.overhead_tokens
    while count < max_size:
        left = lengths[lo - 1] if lo > 0 else None
        right = lengths[hi + 1] if hi + 1 < len(lengths) else None
        # Padding each candidate adds: a shorter item is padded to the width; a longer one widens everyone.
        left_cost = width - left if left is not None and width * (count + 1) <= max_tokens else None
        right_cost = (right - width) * count if right is not None and right * (count + 1) <= max_tokens else None
        if left_cost is None and right_cost is None:
            break
        take_left = right_cost is None or (left_cost is not None and left_cost <= right_cost)
        added, new_width = (left, width) if take_left else (right, right)  # type: ignore[assignment]
        if overhead and (real + added) * (overhead + width * count) < real * (overhead + new_width * (count + 1)):
            break  # real / (overhead + padded) would drop: this batch is as efficient as it gets
        if take_left:
            lo -= 1
        else:
            hi += 1
        width = new_width
        real += added
        count += 1
    return by_length[lo : hi + 1]


def group_cost(prefix: int, longest: int, total: int, count: int, pads: bool) -> int:
    """The tokens a forward computes for ``count`` items of ``total`` tokens, the longest ``longest``, sharing their
    first ``prefix``: the prefix once, then the suffixes padded to the longest (``pads``) or packed. Overstating it
    cuts groups, and the rest of a cut group may run on another worker before its prefix is cached."""
    return prefix + ((longest - prefix) * count if pads else total - prefix * count)


def select_groups(waiting: Sequence[Waiting], live: list[int], limits: BatchLimits) -> list[int] | None:
    """Whole prefix groups, oldest first: the oldest live item and its siblings (live items whose first
    ``group_prefix_tokens`` token ids equal its own, wherever they wait), then the next oldest item left (among the
    ``window_items`` oldest, with a window) and its siblings, ... while the
    batch's cost (:func:`group_cost`; items without siblings padded together, or with ``pads`` False summed) fits
    ``max_batch_tokens`` and its count ``max_batch_size``; a group that does not fit whole is cut, and ends the
    batch. None when the oldest item has no sibling; else indices in age order."""
    width = limits.group_prefix_tokens
    window = live[: limits.window_items] if limits.window_items else live

    def family_key(i: int) -> tuple[int, ...] | None:
        ids = waiting[i].ids
        return tuple(ids[:width]) if len(ids) > width else None  # a sibling needs a token after the shared part

    families: dict[tuple[int, ...], list[int]] = {}
    for i in live:  # siblings come from the whole queue: they overtake others only to share a prefix
        key = family_key(i)
        if key is not None:
            families.setdefault(key, []).append(i)
    head = family_key(live[0])
    if head is None or len(families[head]) < 2:
        return None

    chosen: list[int] = []
    taken: set[int] = set()
    groups = 0  # the cost of the groups taken
    alone: list[int] = []  # lengths of the items without siblings, padded together

    def fits(extra_groups: int, alone_lengths: list[int]) -> bool:
        padded = max(alone_lengths, default=0) * len(alone_lengths) if limits.pads else sum(alone_lengths)
        return groups + extra_groups + padded <= limits.max_batch_tokens

    for i in window:
        if i in taken:
            continue
        key = family_key(i)
        family = [j for j in families[key] if j not in taken] if key is not None else [i]  # i is its oldest
        members = [i]
        ids = waiting[i].ids
        prefix, longest, total, cost = len(ids) - 1, len(ids), len(ids), len(ids)  # shared, longest, sum, cost
        for j in family[1:]:
            shared = min(prefix, common_prefix(ids, waiting[j].ids), waiting[j].length - 1)
            wider, longer = max(longest, waiting[j].length), total + waiting[j].length
            more = group_cost(shared, wider, longer, len(members) + 1, limits.pads)
            if len(chosen) + len(members) >= limits.max_batch_size or not fits(more, alone):
                break
            members.append(j)
            prefix, longest, total, cost = shared, wider, longer, more
        if len(members) == 1:
            if chosen and (len(chosen) >= limits.max_batch_size or not fits(0, [*alone, waiting[i].length])):
                break
            alone.append(waiting[i].length)
        else:
            groups += cost
        chosen += members
        taken.update(members)
        if len(members) < len(family):
            break  # the group was cut: the batch is full
    return sorted(chosen)


class Batcher:
    """The queue and its inference worker threads (``workers``, one by default)."""

    def __init__(
        self,
        forward: Forward,
        limits: BatchLimits = BatchLimits(),
        *,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "reward-inference",
        workers: int = 1,
        on_worker_start: Callable[[], None] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._forward = forward
        self.limits = limits
        self._observer = observer
        self._clock = clock
        self._name = name
        self.workers = workers
        self._on_worker_start = on_worker_start
        self._cond = threading.Condition()
        self._waiting: deque[_Entry] = deque()
        self._queued_tokens = 0
        self._queued_items = 0
        self._seq = itertools.count()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._tokens_per_s = 0.0  # moving average of one worker's real tokens per second, for Retry-After
        self._running = 0  # forwards running now (under the lock)
        self._running_tokens = 0  # their tokens

    # -- the request side (event loop) ---------------------------------------------------------------------
    def submit(self, sequences: Sequence[Sequence[int]], *, budget_s: float | None = None) -> asyncio.Future:
        """Queue one request's token-id lists; the future resolves to their scores, in order.

        Call it from the event loop. Raises :class:`QueueFull`, :class:`RequestTooLarge` or :class:`BatcherClosed`
        at once instead of queueing, and with ``budget_s`` (the seconds left before the request times out)
        :class:`WouldTimeOut` when the measured token rate says the queue ahead and the request would not be scored
        by then. Cancelling the future
        drops the request's items that are still waiting.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ids = [list(s) for s in sequences]
        if any(len(s) == 0 for s in ids):
            raise ValueError("every sequence needs at least one token")
        tokens = sum(len(s) for s in ids)
        limit = self.limits.max_queue_tokens
        if tokens > limit:
            raise RequestTooLarge(tokens, limit)
        job = _Job(future, loop, len(ids), tokens)
        if not ids:
            future.set_result([])
            return future
        with self._cond:
            if self._stopping:
                raise BatcherClosed("the service is shutting down")
            if self._queued_tokens + tokens > limit:
                raise QueueFull(self._queued_tokens, limit, self._retry_after_locked(tokens))
            now = self._clock()
            if budget_s is not None:
                self._refuse_if_late_locked(tokens, budget_s)
            for index, s in enumerate(ids):
                self._waiting.append(_Entry(job, index, s, now, next(self._seq)))
            self._queued_tokens += tokens
            self._queued_items += len(ids)
            self._cond.notify()
        future.add_done_callback(lambda _f, job=job: self._abandon(job))
        return future

    @property
    def queue_depth(self) -> int:
        """Items waiting (not counting the batch being computed)."""
        return self._queued_items

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def busy(self) -> bool:
        """Whether a forward pass is running now."""
        return self._running > 0

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Batcher:
        if not self._threads:
            names = [self._name] if self.workers == 1 else [f"{self._name}-{i}" for i in range(self.workers)]
            self._threads = [threading.Thread(target=self._run, name=name, daemon=True) for name in names]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new work, finish what is queued, and end the workers. True if they ended within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def refuse_waiting(self) -> int:
        """Take no new work, and fail every request with items still waiting with :class:`BatcherClosed` (forwards
        already running finish and deliver). For a drain that cannot finish in time. Returns the requests failed."""
        with self._cond:
            self._stopping = True
            jobs = {id(e.job): e.job for e in self._waiting if not e.job.closed}
            self._cond.notify_all()
        self._fail(list(jobs.values()), BatcherClosed("the service is shutting down and could not score this in time"))
        return len(jobs)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the worker side -----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self._on_worker_start is not None:
            self._on_worker_start()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception as exc:  # a bug here must not kill the worker: fail the batch, go on
                logger.exception("unexpected error while executing a batch")
                self._fail([e.job for e in batch], ForwardFailed(exc))

    def _next_batch(self) -> list[_Entry] | None:
        with self._cond:
            while True:
                self._drop_abandoned_head()
                if not self._waiting:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                if not self._stopping and not self._enough_waiting():
                    remaining = self._waiting[0].enqueued_at + self.limits.max_wait_s - self._clock()
                    if remaining > 0:
                        self._cond.wait(remaining)
                        continue
                batch = self._take_batch()
                if batch:
                    self._running += 1
                    self._running_tokens += sum(e.length for e in batch)
                    if self._waiting and self.workers > 1:
                        self._cond.notify()  # what is left may make another worker's batch
                    return batch

    def _enough_waiting(self) -> bool:
        window = self.limits.window_items
        return (
            self._queued_items >= self.limits.max_batch_size
            or self._queued_tokens >= self.limits.max_batch_tokens
            or (window > 0 and self._queued_items >= window)  # a full window: waiting cannot make a better batch
        )

    def _drop_abandoned_head(self) -> None:
        while self._waiting and self._waiting[0].job.closed:
            self._waiting.popleft()

    def _take_batch(self) -> list[_Entry]:
        """Take :func:`select_batch`'s choice out of the queue, with abandoned items. Holds the lock."""
        waiting = list(self._waiting)
        batch = [waiting[i] for i in select_batch(waiting, self.limits)]
        chosen = set(map(id, batch))
        self._waiting = deque(e for e in waiting if id(e) not in chosen and not e.job.closed)
        for e in batch:
            e.job.queued_tokens -= e.length
            e.job.queued_items -= 1
            self._queued_tokens -= e.length
            self._queued_items -= 1
        return batch

    def _abandon(self, job: _Job) -> None:
        """The request's future is done (answered, failed, timed out or cancelled): forget its waiting items."""
        self._close(job)

    def _close(self, job: _Job, result: list[float] | None = None, error: BaseException | None = None) -> None:
        """The one path that closes a request (answered, failed or abandoned): its waiting items leave the queue's
        counts, and its future gets ``result`` or ``error``, once, whichever worker or callback comes first."""
        with self._cond:
            if job.closed:
                return
            job.closed = True
            self._queued_tokens -= job.queued_tokens
            self._queued_items -= job.queued_items
            job.queued_tokens = job.queued_items = 0
        if result is not None or error is not None:
            self._post(job, result, error)

    def _execute(self, batch: list[_Entry]) -> None:
        live = [e for e in batch if not e.job.closed]  # a request may have gone while the batch formed
        if not live:
            self._forward_ended(batch, 0.0)
            return
        started = self._clock()
        waits = [started - e.enqueued_at for e in live]
        real = sum(e.length for e in live)
        padded = max(e.length for e in live) * len(live)
        ok = False
        try:
            scores = self._forward_in_halves([e.ids for e in live])
            ok = True
        except Exception as exc:
            logger.error("forward pass over %d items failed: %s: %s", len(live), exc.__class__.__name__, exc)
            self._fail([e.job for e in live], ForwardFailed(exc))
        else:
            self._deliver(live, scores)
        finally:
            elapsed = self._clock() - started
            self._forward_ended(batch, real / elapsed if ok and elapsed > 0 else 0.0)
        if self._observer is not None:
            try:
                self._observer.batch_done(BatchReport(len(live), padded, real, waits, elapsed, ok))
            except Exception:  # metrics must never break scoring
                logger.exception("batch observer failed")

    def _forward_ended(self, batch: list[_Entry], tokens_per_s: float) -> None:
        """A forward is over; ``tokens_per_s`` (0: not measured) feeds the rate that Retry-After and early refusal
        are computed from."""
        with self._cond:
            self._running -= 1
            self._running_tokens -= sum(e.length for e in batch)
            if tokens_per_s > 0:
                rate = self._tokens_per_s
                self._tokens_per_s = tokens_per_s if rate == 0 else 0.8 * rate + 0.2 * tokens_per_s

    def _forward_in_halves(self, batch: list[list[int]]) -> list[float]:
        try:
            scores = list(self._forward(batch))
        except BatchTooLarge:
            if len(batch) == 1:
                raise
            half = len(batch) // 2
            logger.warning("batch of %d items too large for the device; retrying in halves", len(batch))
            return self._forward_in_halves(batch[:half]) + self._forward_in_halves(batch[half:])
        if len(scores) != len(batch):
            raise RuntimeError(f"forward returned {len(scores)} scores for {len(batch)} items")
        return scores

    def _deliver(self, entries: list[_Entry], scores: list[float]) -> None:
        """Record a batch's scores (``_forward_in_halves`` checked the count) under the lock: one request's items may
        be in two workers' batches at once. A request whose last score this is is closed with its scores."""
        finished = []
        with self._cond:
            for entry, score in zip(entries, scores, strict=True):
                job = entry.job
                if job.closed:  # failed in another worker's batch, or timed out: nobody wants the rest
                    continue
                job.scores[entry.index] = float(score)
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        for job in finished:
            self._close(job, job.scores)

    def _fail(self, jobs: list[_Job], error: BaseException) -> None:
        for job in {id(j): j for j in jobs}.values():
            self._close(job, error=error)

    @staticmethod
    def _post(job: _Job, result: list[float] | None, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _refuse_if_late_locked(self, tokens: int, budget_s: float) -> None:
        """Raise :class:`WouldTimeOut` when the queued tokens and ``tokens`` more take longer than ``budget_s`` at the
        measured rate (the workers' scored tokens per second of forward; nothing is refused before one is measured).
        The tokens of the forwards running now count as waiting: they are at most a forward from done."""
        rate = self._tokens_per_s * self.workers
        if rate <= 0:
            return
        ahead = self._queued_tokens + tokens + self._running_tokens
        wait_s = ahead / rate
        if wait_s > budget_s:
            retry = int(min(60, max(1, math.ceil((ahead - rate * max(budget_s, 0.0)) / rate))))
            raise WouldTimeOut(wait_s, budget_s, retry)

    def _retry_after_locked(self, extra_tokens: int) -> int:
        """Seconds until the queue has likely drained enough to admit ``extra_tokens`` more (1 to 60)."""
        excess = self._queued_tokens + extra_tokens - self.limits.max_queue_tokens
        rate = self._tokens_per_s * self.workers
        if rate <= 0 or excess <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess / rate))))
