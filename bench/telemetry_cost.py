"""``python -m bench.telemetry_cost``: what the reward telemetry costs, timed in-process, and with ``--checkpoint``
under load.

In-process: the scoring path's share (:meth:`RewardTelemetry.observe`, once per request after its scores are
computed) for one-text and 64-text requests, and one scrape of ``/metrics``'s telemetry with a full window (folding
the pending scores into the histogram, the window's mean, std, correlation and drift). Compare the first with the
CPU time a text costs the service (a MiniLM-sized model: tens of milliseconds on a CPU core).

Under load (``--checkpoint``): two services of that checkpoint, one with the telemetry on (the default) and one with
``--reward-telemetry false``, both started first, then loaded in turn (on, off, on, off, ...) by the same closed-loop
clients; every repeat's texts/s and the on/off ratio of each pair.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy  # noqa: F401  (the server has it imported long before the first request)
from prometheus_client import CollectorRegistry, generate_latest

from bench.load import build_payloads, closed_loop, run
from bench.servers import Server, service_argv
from bench.texts import DEMO, add_data_arguments, load_pool, load_rows
from service.engine import Scored
from service.telemetry import RewardTelemetry


class _Model:
    name, version, normalization = "model", "v1", {"mean": 0.0, "std": 1.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1000, help="telemetry window (default 1000, the service's)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each kind (default 3)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="also time two services of it under load")
    parser.add_argument("--clients", type=int, default=64, help="under load: one-text clients (default 64)")
    parser.add_argument("--duration-s", type=float, default=15.0, help="under load: seconds per measured window")
    add_data_arguments(parser, default=DEMO)
    args = parser.parse_args(argv)
    in_process(args)
    if args.checkpoint is not None:
        under_load(args)
    return 0


def in_process(args: argparse.Namespace) -> None:
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


def under_load(args: argparse.Namespace) -> None:
    rows, source = load_rows(args.data, data_dir=args.data_dir, split=args.split)
    pool = load_pool(512, rows, source)
    payloads = build_payloads(pool.items, [0] * len(pool.items), 1)
    sides = {"on": [], "off": []}
    with (
        Server("telemetry-on", service_argv(args.checkpoint, "float32")).start() as on,
        Server(
            "telemetry-off", service_argv(args.checkpoint, "float32", ["--reward-telemetry", "false"])
        ).start() as off,
    ):
        for repeat in range(args.repeats):
            for name, server in (("on", on), ("off", off)):
                result = run(
                    lambda server=server: closed_loop(
                        f"{server.url}/score",
                        payloads,
                        concurrency=args.clients,
                        warmup_s=3.0,
                        duration_s=args.duration_s,
                    )
                )
                summary = result.summary()
                sides[name].append(summary["texts_per_s"])
                print(
                    f"repeat {repeat + 1}, telemetry {name:3s}: {summary['texts_per_s']:7.2f} texts/s, "
                    f"{summary['failed_requests']} failed"
                )
    pairs = [a / b for a, b in zip(sides["on"], sides["off"], strict=True)]
    print(
        f"{args.clients} one-text clients, {source}; on / off per pair: {', '.join(f'{r:.3f}' for r in pairs)}; "
        f"median {statistics.median(pairs):.3f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
