"""The in-process ceiling: the model called directly, no HTTP, no queue, on the same texts as the service.

For each batch size, the whole pool is cut into batches after sorting it by length (so each batch pads little),
and the time of one full pass is measured with :func:`training.checkpoint.forward_scores` (the very function the
service's backend calls, ``torch.inference_mode`` included). The best batch size gives the ceiling. Two references
are measured too: one text at a time, and unsorted batches padded to their longest text (what a server that runs
each request's texts as they come does with 64-text requests).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench.procstat import CpuProbe


def _batches_sorted(lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def _batches_unsorted(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


Forward = Callable[[list[list[int]]], list[float]]


def torch_forward(checkpoint: Any) -> Forward:
    """The service's torch backend: ``forward_scores`` on the checkpoint (eager transformers)."""
    from training.checkpoint import forward_scores

    return lambda batch: forward_scores(checkpoint, batch)


def _warm_up(forward: Forward, sequences: Sequence[Sequence[int]], largest_batch: int) -> None:
    """Lazy initialisation and the allocator's first large blocks are not part of any measurement."""
    forward([list(s) for s in sorted(sequences, key=len)[-largest_batch:]])
    forward([list(sequences[0])])


def _passes(batches: list[list[int]], seed: int, min_seconds: float, started: float) -> Iterator[list[int]]:
    """Whole passes over ``batches``, each in a new shuffled order, until ``min_seconds`` have passed (at least one)."""
    order = list(batches)
    passes = 0
    while passes == 0 or time.perf_counter() - started < min_seconds:
        random.Random(seed + passes).shuffle(order)  # mixes short and long batches, as a live queue would
        yield from order
        passes += 1


def run_pass(
    checkpoint: Any,
    sequences: Sequence[Sequence[int]],
    batches: list[list[int]],
    *,
    seed: int = 0,
    min_seconds: float = 0.0,
    workers: int = 1,
    forward: Forward | None = None,
) -> dict[str, Any]:
    """Time passes over ``batches`` (index lists into ``sequences``), each in a shuffled order, repeated until
    ``min_seconds`` have passed (at least one pass): a few-second pass on a shared virtual machine is noisy.

    With ``workers`` > 1, that many threads take the batches in turn, each with torch's threads divided among them
    (the service's ``--inference-workers`` layout); the last pass is finished, never cut. ``forward`` is the
    backend's forward (default: torch's, :func:`torch_forward`)."""
    forward = forward or torch_forward(checkpoint)
    order = list(batches)
    real = sum(len(sequences[i]) for b in order for i in b)
    padded = sum(max(len(sequences[i]) for i in b) * len(b) for b in order)
    probe = CpuProbe()
    started = time.perf_counter()
    feed = _passes(order, seed, min_seconds, started)
    done = 0

    def work(set_up_thread: Callable[[], None] | None) -> None:
        nonlocal done
        if set_up_thread is not None:
            set_up_thread()
        while True:
            with lock:
                batch = next(feed, None)
            if batch is None:
                return
            forward([sequences[i] for i in batch])
            with lock:
                done += 1

    lock = threading.Lock()
    if workers == 1:
        work(None)
    else:
        from service.backend import plan_threads

        plan = plan_threads("cpu", workers=workers)  # the service's split of torch's threads
        threads = [threading.Thread(target=work, args=(plan.apply,)) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    passes = done // len(order)
    elapsed = time.perf_counter() - started
    cpu = probe.stop()
    texts = sum(len(b) for b in order) * passes
    real, padded = real * passes, padded * passes
    own_cores = cpu.get("bench_process_cores") or 0.0
    return {
        "texts": texts,
        "passes": passes,
        "workers": workers,
        "seconds": round(elapsed, 3),
        "texts_per_s": texts / elapsed,
        # per second of this process's CPU time: barely moved by others sharing the machine (with one torch thread
        # per worker; an OpenMP team also counts the time its threads spin at barriers)
        "texts_per_cpu_s": texts / (own_cores * elapsed) if own_cores > 0 else None,
        "tokens_per_s": real / elapsed,
        "forwards": len(order) * passes,
        "mean_items_per_forward": texts / (len(order) * passes),
        "padding_efficiency": real / padded,
        "forward_busy": 1.0,
        "forward_padded_tokens_per_s": padded / elapsed,
        "cpu": cpu,
    }


def _others(result: dict[str, Any]) -> str:
    per_cpu = result.get("texts_per_cpu_s")
    others = result["cpu"].get("others_cores")
    return (f"{per_cpu:6.1f} texts/CPU-s  " if per_cpu else "") + (
        "" if others is None else f"(others used {others:.2f} cores)"
    )


def measure(
    checkpoint: Any,
    sequences: Sequence[Sequence[int]],
    *,
    batch_sizes: Sequence[int] = (4, 8, 16, 32),
    workers: Sequence[int] = (1,),
    references: bool = True,
    unsorted_size: int = 64,
    log=print,
    before_pass=None,
    retries: int = 0,
    contaminated: float = float("inf"),
    min_seconds: float = 0.0,
    forward_for: Callable[[int], Forward] | None = None,
) -> dict[str, Any]:
    """The sweep and the ceiling (the best sorted batch size and worker layout) over ``sequences`` (token-id lists);
    each sorted batch size is timed for at least ``min_seconds`` with each number of ``workers`` (the references for
    one pass, with one worker). ``forward_for(workers)`` is the forward each of that many workers calls (default:
    torch's, :func:`torch_forward`)."""
    lengths = [len(s) for s in sequences]
    if forward_for is None:
        forward = torch_forward(checkpoint)
        forward_for = lambda workers: forward  # noqa: E731
    for n_workers in {1, *workers}:
        _warm_up(forward_for(n_workers), sequences, max(batch_sizes))
    sweep: dict[str, dict[str, Any]] = {}
    before_pass = before_pass or (lambda: None)

    def clean_pass(batches: list[list[int]], seconds: float = 0.0, n_workers: int = 1) -> dict[str, Any]:
        for attempt in range(1 + retries):
            before_pass()
            result = run_pass(
                checkpoint, sequences, batches, min_seconds=seconds, workers=n_workers, forward=forward_for(n_workers)
            )
            if (result["cpu"].get("others_cores") or 0.0) <= contaminated or attempt == retries:
                break
            log(f"  (others used {result['cpu']['others_cores']:.2f} cores during the pass: measuring again)")
        return result

    for size in batch_sizes:
        for n_workers in workers:
            result = clean_pass(_batches_sorted(lengths, size), min_seconds, n_workers)
            sweep[sweep_key(size, n_workers)] = {"batch_size": size, "sorted": True, **result}
            log(
                f"  ceiling sweep: sorted batches of {size:>3}, {layout(n_workers)}: {result['texts_per_s']:7.1f} "
                f"texts/s  {_others(result)}"
            )
    if references:
        result = clean_pass(_batches_sorted(lengths, 1))
        sweep["one_at_a_time"] = {"batch_size": 1, "sorted": False, **result}
        log(f"  reference: one text at a time:       {result['texts_per_s']:7.1f} texts/s  {_others(result)}")
        size = min(unsorted_size, len(sequences))
        result = clean_pass(_batches_unsorted(len(sequences), size))
        sweep[f"unsorted_{size}"] = {"batch_size": size, "sorted": False, **result}
        log(f"  reference: unsorted batches of {size:>3}: {result['texts_per_s']:7.1f} texts/s  {_others(result)}")
    best_key = max((k for k, v in sweep.items() if v["sorted"]), key=lambda k: sweep[k]["texts_per_s"])
    return {"best": best_key, "ceiling": sweep[best_key], "sweep": sweep}


def sweep_key(batch_size: int, workers: int) -> str:
    return f"sorted_{batch_size}" if workers == 1 else f"sorted_{batch_size}_x{workers}"


def layout(workers: int) -> str:
    return "1 worker" if workers == 1 else f"{workers} workers"


def remeasure(
    checkpoint: Any,
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    *,
    min_seconds: float = 0.0,
    workers: int = 1,
    forward: Forward | None = None,
) -> dict[str, Any]:
    """The ceiling's batch size and layout timed again (around each load scenario: the machine's speed drifts)."""
    forward = forward or torch_forward(checkpoint)
    _warm_up(forward, sequences, batch_size)
    return run_pass(
        checkpoint,
        sequences,
        _batches_sorted([len(s) for s in sequences], batch_size),
        min_seconds=min_seconds,
        workers=workers,
        forward=forward,
    )
