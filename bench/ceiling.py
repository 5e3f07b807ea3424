"""The in-process ceiling: the model called directly, no HTTP, no queue, on the same texts as the service.

For each batch size, the whole pool is cut into batches after sorting it by length (so each batch pads little),
and the time of one full pass is measured with :func:`training.checkpoint.forward_scores` (the very function the
service's backend calls, ``torch.inference_mode`` included). The best batch size gives the ceiling. Two references
are measured too: one text at a time, and unsorted batches padded to their longest text (what a server that runs
each request's texts as they come does with 64-text requests).
"""

from __future__ import annotations

import random
import time
from typing import Any, Sequence

from bench.procstat import CpuProbe


def _batches_sorted(lengths: Sequence[int], size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def _batches_unsorted(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def run_pass(checkpoint: Any, sequences: Sequence[Sequence[int]], batches: list[list[int]], *, seed: int = 0) -> dict[str, Any]:
    """Time one pass over ``batches`` (index lists into ``sequences``), in a shuffled order."""
    from training.checkpoint import forward_scores

    order = list(batches)
    random.Random(seed).shuffle(order)  # mixes short and long batches, as a live queue would
    real = sum(len(sequences[i]) for b in order for i in b)
    padded = sum(max(len(sequences[i]) for i in b) * len(b) for b in order)
    probe = CpuProbe()
    started = time.perf_counter()
    for batch in order:
        forward_scores(checkpoint, [sequences[i] for i in batch])
    elapsed = time.perf_counter() - started
    cpu = probe.stop()
    texts = sum(len(b) for b in order)
    return {
        "texts": texts,
        "seconds": round(elapsed, 3),
        "texts_per_s": texts / elapsed,
        "tokens_per_s": real / elapsed,
        "forwards": len(order),
        "mean_items_per_forward": texts / len(order),
        "padding_efficiency": real / padded,
        "forward_busy": 1.0,
        "forward_padded_tokens_per_s": padded / elapsed,
        "cpu": cpu,
    }


def _others(result: dict[str, Any]) -> str:
    others = result["cpu"].get("others_cores")
    return "" if others is None else f"(others used {others:.2f} cores)"


def measure(
    checkpoint: Any,
    sequences: Sequence[Sequence[int]],
    *,
    batch_sizes: Sequence[int] = (4, 8, 16, 32),
    references: bool = True,
    unsorted_size: int = 64,
    log=print,
    before_pass=None,
    retries: int = 0,
    contaminated: float = float("inf"),
) -> dict[str, Any]:
    """The sweep and the ceiling (the best sorted batch size) over ``sequences`` (token-id lists)."""
    from training.checkpoint import forward_scores

    lengths = [len(s) for s in sequences]
    # Warm-up: lazy initialisation and the allocator's first large blocks are not part of any measurement.
    longest = sorted(range(len(sequences)), key=lambda i: lengths[i])[-max(batch_sizes):]
    forward_scores(checkpoint, [sequences[i] for i in longest])
    forward_scores(checkpoint, [sequences[0]])
    sweep: dict[str, dict[str, Any]] = {}
    before_pass = before_pass or (lambda: None)

    def clean_pass(batches: list[list[int]]) -> dict[str, Any]:
        for attempt in range(1 + retries):
            before_pass()
            result = run_pass(checkpoint, sequences, batches)
            if (result["cpu"].get("others_cores") or 0.0) <= contaminated:
                break
            log(f"  (others used {result['cpu']['others_cores']:.2f} cores during the pass: measuring again)")
        return result

    for size in batch_sizes:
        result = clean_pass(_batches_sorted(lengths, size))
        sweep[f"sorted_{size}"] = {"batch_size": size, "sorted": True, **result}
        log(f"  ceiling sweep: sorted batches of {size:>3}: {result['texts_per_s']:7.1f} texts/s  {_others(result)}")
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
