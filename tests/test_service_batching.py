"""The batching engine on its own: a fake forward, no model, no HTTP."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from service.batching import (
    Batcher,
    BatcherClosed,
    BatchLimits,
    BatchReport,
    BatchTooLarge,
    ForwardFailed,
    QueueFull,
    RequestTooLarge,
    WouldTimeOut,
)


class RecordingForward:
    """Scores a sequence as ``len(ids) + ids[0] / 1000``; records every batch; can be held and made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail_on_token: int | None = None
        self.too_large_above: int | None = None

    def __call__(self, batch: list[list[int]]) -> list[float]:
        self.entered.set()
        assert self.release.wait(10), "test forgot to release the forward"
        if self.too_large_above is not None and len(batch) > self.too_large_above:
            raise BatchTooLarge(f"{len(batch)} items")
        self.batches.append([list(ids) for ids in batch])
        if self.fail_on_token is not None and any(self.fail_on_token in ids for ids in batch):
            raise RuntimeError("injected failure")
        return [len(ids) + ids[0] / 1000 for ids in batch]


def expected(ids: list[int]) -> float:
    return len(ids) + ids[0] / 1000


def seq(first: int, length: int) -> list[int]:
    return [first] + [7] * (length - 1)


class Reports:
    def __init__(self) -> None:
        self.items: list[BatchReport] = []

    def batch_done(self, report: BatchReport) -> None:
        self.items.append(report)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def batches_queued_behind_a_busy_worker(limits: BatchLimits, lengths: list[int]) -> list[list[int]]:
    """One-text requests of ``lengths`` queued, in this order, while the only worker is busy; then released. Returns
    the lengths in each batch the worker then formed, in the order it ran them."""
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, limits).start()

    async def main():
        blocker = batcher.submit([seq(0, 2)])
        await asyncio.to_thread(forward.entered.wait, 5)
        futures = [batcher.submit([seq(100 + i, n)]) for i, n in enumerate(lengths)]
        forward.release.set()
        await asyncio.gather(blocker, *futures)

    run(main())
    batcher.stop(5)
    return [[len(ids) for ids in b] for b in forward.batches[1:]]


def test_results_come_back_in_order_and_requests_share_a_forward():
    forward = RecordingForward()
    reports = Reports()
    batcher = Batcher(forward, BatchLimits(max_wait_s=0.2), observer=reports).start()

    async def main():
        requests = [[seq(1, 3), seq(2, 5)], [seq(3, 4)], [seq(4, 2), seq(5, 6), seq(6, 3)]]
        futures = [batcher.submit(r) for r in requests]
        results = await asyncio.gather(*futures)
        for request, scores in zip(requests, results, strict=True):
            assert scores == [expected(ids) for ids in request]  # exact: the fake forward's numbers, routed back

    run(main())
    batcher.stop(5)
    assert len(forward.batches) == 1 and len(forward.batches[0]) == 6
    assert reports.items[0].items == 6
    assert reports.items[0].padded_tokens == 6 * 6 and reports.items[0].real_tokens == 3 + 5 + 4 + 2 + 6 + 3


def test_batches_respect_size_and_padded_token_limits():
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, BatchLimits(max_batch_tokens=40, max_batch_size=4, max_wait_s=0.0)).start()

    async def main():
        first = batcher.submit([seq(0, 2)])
        await asyncio.to_thread(forward.entered.wait, 5)  # the worker is busy: the rest queues up
        rest = batcher.submit([seq(i, 5 + (i % 4)) for i in range(1, 21)])
        forward.release.set()
        await asyncio.gather(first, rest)

    run(main())
    batcher.stop(5)
    for batch in forward.batches:
        assert len(batch) <= 4
        assert max(map(len, batch)) * len(batch) <= 40
    assert sum(len(b) for b in forward.batches) == 21


def test_each_batch_holds_the_oldest_item_and_groups_similar_lengths():
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3, max_wait_s=0.0)
    # Arrival order: a long one first, then short ones interleaved with other long ones.
    batches = batches_queued_behind_a_busy_worker(limits, [50, 5, 51, 6, 52, 7, 53, 8])
    # the oldest (50) goes first, with its nearest lengths; then the oldest remaining (5) with the short ones
    assert sorted(batches[0]) == [50, 51, 52]
    assert sorted(batches[1]) == [5, 6, 7]
    assert sorted(batches[2]) == [8, 53]


@pytest.mark.parametrize("overhead, expected_batches", [(0, [[10, 10, 10, 40]]), (16, [[10, 10, 10], [40]])])
def test_overhead_tokens_leave_an_item_that_costs_more_padding_than_it_saves(overhead, expected_batches):
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=8, max_wait_s=0.0, overhead_tokens=overhead)
    batches = batches_queued_behind_a_busy_worker(limits, [10, 10, 10, 40])
    # 3 x 10 real in 16 + 30 padded (0.65) against 70 real in 16 + 160 padded (0.40): without an overhead the 40 joins
    assert [sorted(b) for b in batches] == expected_batches


def test_a_long_item_is_not_starved_by_a_stream_of_short_ones():
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, BatchLimits(max_batch_tokens=64, max_batch_size=8, max_wait_s=0.0)).start()

    async def main():
        blocker = batcher.submit([seq(0, 2)])
        await asyncio.to_thread(forward.entered.wait, 5)
        shorts = [batcher.submit([seq(i, 3)]) for i in range(1, 9)]
        long = batcher.submit([seq(999, 40)])
        more = [batcher.submit([seq(i, 3)]) for i in range(10, 40)]
        forward.release.set()
        await asyncio.gather(blocker, long, *shorts, *more)

    run(main())
    batcher.stop(5)
    position = next(i for i, b in enumerate(forward.batches) if any(ids[0] == 999 for ids in b))
    assert position <= 2, [len(b) for b in forward.batches]  # right after the items that arrived before it


def test_a_cancelled_request_costs_no_compute_and_leaves_the_queue():
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, BatchLimits(max_wait_s=0.0)).start()

    async def main():
        blocker = batcher.submit([seq(0, 2)])
        await asyncio.to_thread(forward.entered.wait, 5)
        gone = batcher.submit([seq(500, 4), seq(501, 4)])
        kept = batcher.submit([seq(600, 4)])
        assert batcher.queue_depth == 3 and batcher.queued_tokens == 12
        gone.cancel()
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert batcher.queue_depth == 1 and batcher.queued_tokens == 4
        forward.release.set()
        assert await kept == [expected(seq(600, 4))]  # exact: the fake forward's number
        await blocker

    run(main())
    batcher.stop(5)
    computed = {ids[0] for batch in forward.batches for ids in batch}
    assert 500 not in computed and 501 not in computed and 600 in computed


def test_a_failing_forward_fails_only_its_batch_and_the_worker_goes_on():
    forward = RecordingForward()
    forward.fail_on_token = 13
    reports = Reports()
    batcher = Batcher(forward, BatchLimits(max_batch_size=1, max_wait_s=0.0), observer=reports).start()

    async def main():
        bad = batcher.submit([seq(13, 3)])
        good = batcher.submit([seq(14, 3)])
        with pytest.raises(ForwardFailed, match="injected failure"):
            await bad
        assert await good == [expected(seq(14, 3))]  # exact: the fake forward's number
        assert await batcher.submit([seq(15, 2)]) == [expected(seq(15, 2))]

    run(main())
    batcher.stop(5)
    assert [r.ok for r in reports.items] == [False, True, True]


def test_a_batch_too_large_for_the_device_is_retried_in_halves():
    forward = RecordingForward()
    forward.too_large_above = 2
    batcher = Batcher(forward, BatchLimits(max_wait_s=0.05)).start()

    async def main():
        request = [seq(i, 3 + i % 3) for i in range(1, 9)]
        assert await batcher.submit(request) == [expected(ids) for ids in request]  # exact: the fake's numbers

    run(main())
    batcher.stop(5)
    assert all(len(b) <= 2 for b in forward.batches)


def test_the_queue_is_bounded_in_tokens():
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, BatchLimits(max_batch_tokens=16, max_queue_tokens=20, max_wait_s=0.0)).start()

    async def main():
        blocker = batcher.submit([seq(0, 2)])
        await asyncio.to_thread(forward.entered.wait, 5)
        queued = batcher.submit([seq(1, 8), seq(2, 8)])
        with pytest.raises(QueueFull) as info:
            batcher.submit([seq(3, 8)])
        assert info.value.retry_after_s >= 1
        with pytest.raises(RequestTooLarge):
            batcher.submit([seq(4, 21)])
        forward.release.set()
        await asyncio.gather(blocker, queued)
        assert await batcher.submit([seq(5, 8)]) == [expected(seq(5, 8))]  # room again (exact: the fake's number)

    run(main())
    batcher.stop(5)


def test_stop_finishes_queued_work_then_refuses_new_work():
    forward = RecordingForward()
    forward.release.clear()
    batcher = Batcher(forward, BatchLimits(max_batch_size=2, max_wait_s=0.0)).start()

    async def main():
        futures = [batcher.submit([seq(i, 3)]) for i in range(6)]
        await asyncio.to_thread(forward.entered.wait, 5)
        stopper = asyncio.create_task(asyncio.to_thread(batcher.stop, 10))
        while not batcher.stopping:  # the stop has begun (bounded by run()'s timeout)
            await asyncio.sleep(0.001)
        with pytest.raises(BatcherClosed):
            batcher.submit([seq(9, 3)])
        forward.release.set()
        assert await stopper is True
        return await asyncio.gather(*futures)

    results = run(main())
    assert results == [[expected(seq(i, 3))] for i in range(6)]  # exact: the fake forward's numbers


def test_two_workers_compute_two_batches_at_once_and_answer_each_request():
    barrier = threading.Barrier(2, timeout=10)
    calls = itertools.count()
    computed_on: set[str] = set()
    started_on: list[str] = []

    def forward(batch: list[list[int]]) -> list[float]:
        computed_on.add(threading.current_thread().name)
        if next(calls) < 2:
            barrier.wait()  # BrokenBarrierError (a failed batch) unless a second forward runs at the same time
        return [expected(ids) for ids in batch]

    batcher = Batcher(
        forward,
        BatchLimits(max_batch_size=2, max_wait_s=0.0),
        workers=2,
        on_worker_start=lambda: started_on.append(threading.current_thread().name),
    ).start()

    async def main():
        requests = [[seq(i, 3 + i % 4), seq(100 + i, 2)] for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        assert results == [[expected(ids) for ids in r] for r in requests]  # exact: the fake forward's numbers

    run(main())
    assert batcher.stop(5) is True
    assert sorted(started_on) == ["reward-inference-0", "reward-inference-1"]
    assert computed_on == set(started_on)
    assert not batcher.busy


def test_requests_split_across_two_workers_are_each_answered_once_with_all_their_scores(monkeypatch):
    """Batches of two, requests of five items, two workers: a request's items sit in both workers' batches at once,
    and what is left of it is counted by both. Every request gets all its scores, in order, and is answered once.
    The thread switch interval is cut to its minimum so that the workers interleave as often as they can."""
    import sys
    from collections import Counter

    answers: Counter[int] = Counter()
    post = Batcher._post

    def counted(job, result, error):
        answers[id(job.future)] += 1
        post(job, result, error)

    monkeypatch.setattr(Batcher, "_post", staticmethod(counted))
    batcher = Batcher(
        lambda batch: [float(ids[0]) for ids in batch], BatchLimits(max_batch_size=2, max_wait_s=0.0), workers=2
    )
    requests = [[[r * 10 + i] for i in range(5)] for r in range(400)]

    async def main():
        futures = [batcher.submit(r) for r in requests]
        return await asyncio.wait_for(asyncio.gather(*futures), 60)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        batcher.start()
        results = run(main())
    finally:
        sys.setswitchinterval(interval)
    assert results == [[float(ids[0]) for ids in r] for r in requests]  # exact: the fake forward's numbers
    assert len(answers) == len(requests) and set(answers.values()) == {1}
    assert batcher.stop(5) is True
    assert (batcher.queue_depth, batcher.queued_tokens) == (0, 0)


def test_a_batcher_needs_a_worker():
    with pytest.raises(ValueError, match="workers"):
        Batcher(RecordingForward(), workers=0)


@pytest.mark.parametrize("window, expected_first", [(0, [5, 5, 5]), (3, [5, 9, 40])])
def test_window_items_limits_neighbours_to_the_oldest_waiting(window, expected_first):
    """With a window, a batch's neighbours come from the oldest waiting items only, whatever their lengths: later
    arrivals of the oldest's length do not overtake the items between them."""
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3, max_wait_s=0.0, window_items=window)
    batches = batches_queued_behind_a_busy_worker(limits, [5, 9, 40, 5, 5])
    assert sorted(batches[0]) == expected_first
    assert sorted(n for b in batches for n in b) == [5, 5, 5, 9, 40]


def test_work_that_cannot_finish_before_its_timeout_is_refused_at_once():
    now = [0.0]
    forward = RecordingForward()

    def timed(batch: list[list[int]]) -> list[float]:
        scores = forward(batch)
        now[0] += sum(len(ids) for ids in batch) / 100  # this fake scores 100 tokens per second
        return scores

    batcher = Batcher(timed, BatchLimits(max_batch_tokens=64, max_wait_s=0.0), clock=lambda: now[0]).start()

    async def main():
        assert await batcher.submit([seq(1, 50)], budget_s=1.0) == [expected(seq(1, 50))]  # nothing measured yet
        forward.release.clear()
        forward.entered.clear()
        blocker = batcher.submit([seq(0, 60)])  # 60 tokens in the forward...
        await asyncio.to_thread(forward.entered.wait, 5)
        admitted = batcher.submit([seq(2, 40)] * 5, budget_s=5.0)  # ... + 200 queued: 2.6 s at 100 tokens/s
        with pytest.raises(WouldTimeOut) as info:
            batcher.submit([seq(3, 40)] * 7, budget_s=5.0)  # 260 + 280 = 540 tokens: 5 s is not enough
        assert isinstance(info.value, QueueFull) and info.value.retry_after_s == 1
        with pytest.raises(WouldTimeOut) as info:
            batcher.submit([seq(4, 50)] * 10, budget_s=2.0)  # 760 tokens, 7.6 s; in about 5.6 s it would fit
        assert info.value.retry_after_s == 6
        later = batcher.submit([seq(5, 40)] * 6)  # without a budget only the queue's size limits
        forward.release.set()
        await asyncio.gather(blocker, admitted, later)

    run(main())
    batcher.stop(5)
