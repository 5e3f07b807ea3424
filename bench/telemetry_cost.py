"""``python -m bench.telemetry_cost``: what the reward telemetry costs, timed in-process.

The scoring path's share (:meth:`RewardTelemetry.observe`, once per request after its scores are computed) for
one-text and 64-text requests, and one scrape of ``/metrics``'s telemetry with a full window (folding the pending
scores into the histogram, the window's mean, std, correlation and drift). Compare the first with the CPU time a
text costs the service (a MiniLM-sized model: tens of milliseconds on a CPU core).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy  # noqa: F401  (the server has it imported long before the first request)
from prometheus_client import CollectorRegistry, generate_latest

from service.engine import Scored
from service.telemetry import RewardTelemetry


class _Model:
    name, version, normalization = "model", "v1", {"mean": 0.0, "std": 1.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1000, help="telemetry window (default 1000, the service's)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each kind (default 3)")
    args = parser.parse_args(argv)
    registry = CollectorRegistry()
    telemetry = RewardTelemetry(registry, window=args.window)
    for _ in range(args.repeats):
        for size, calls in ((1, 20_000), (64, 2_000)):
            scored = Scored([0.01 * i for i in range(size)], [i % 7 == 0 for i in range(size)], list(range(size)))
            start = time.perf_counter()
            for _ in range(calls):
                telemetry.observe(_Model, scored)
            per_call = (time.perf_counter() - start) / calls
            print(f"observe, {size:2d} text(s) per request: {per_call * 1e6:6.2f} us per request")
        start = time.perf_counter()
        for _ in range(50):
            generate_latest(registry)
        print(f"scrape, window of {args.window} full: {(time.perf_counter() - start) / 50 * 1e3:6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
