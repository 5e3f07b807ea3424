"""``python -m bench.failover``: two replicas behind ``RewardClient([a, b])``, one killed (or drained) under load.

    python -m bench.failover                         # the benchmark's MiniLM checkpoint (trained for 5 steps if absent)
    python -m bench.failover --checkpoint DIR --fault term --threads 8 --calls 40
    python -m bench.failover --smoke                 # a tiny random model: checks the harness, says nothing of speed

Several threads each make ``--calls`` calls of ``--texts-per-call`` texts (``--data``: hh-rlhf transcripts by
default, the demo pairs with ``--smoke``; see :mod:`bench.texts`). Once ``--fault-after`` calls are answered,
replica A gets SIGKILL (``--fault kill``) or SIGTERM (``--fault term``: it drains). Printed: whether every call was
answered with all its scores, throughput and call latency (p50, p99, max) before the fault and from it on, and how
the client treated the dead replica: how many requests still went to it after the fault, how long they took in all,
and when the last one was sent.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.procstat import _process_seconds, describe_machine
from bench.servers import Server, service_argv
from bench.texts import DEMO, HUB_DATA, add_data_arguments, load_pool, load_rows


@dataclass(frozen=True)
class Attempt:
    port: int
    thread: int
    started: float
    ended: float
    outcome: int | str  # the status code, or the transport error's class name


class RecordingTransport(httpx.HTTPTransport):
    """httpx's own transport, recording every attempt a client makes (replica, thread, start, end, outcome) and
    counting the requests sent to each replica, for code that waits for "a request is at replica A"."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()
        self.in_flight: collections.Counter[int] = collections.Counter()
        self.started: collections.Counter[int] = collections.Counter()
        self.attempts: list[Attempt] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        port, started, outcome = request.url.port or 80, time.monotonic(), "?"
        with self.changed:
            self.in_flight[port] += 1
            self.started[port] += 1
            self.changed.notify_all()
        try:
            response = super().handle_request(request)
            outcome = response.status_code
            return response
        except httpx.TransportError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            with self.changed:
                self.in_flight[port] -= 1
                self.attempts.append(Attempt(port, threading.get_ident(), started, time.monotonic(), outcome))
                self.changed.notify_all()

    def at(self, port: int) -> list[Attempt]:
        with self.changed:
            return [a for a in self.attempts if a.port == port]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    return _process_seconds(pid) or 0.0


def summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "max_s": max(latencies, default=None),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint to serve (default: bench's MiniLM)")
    p.add_argument("--smoke", action="store_true", help="serve a tiny random model (harness check only)")
    add_data_arguments(p)
    p.set_defaults(data=None)  # Anthropic/hh-rlhf; --smoke: the demo pairs
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=6, help="client threads (default 6)")
    p.add_argument("--calls", type=int, default=12, help="calls per thread (default 12)")
    p.add_argument("--texts-per-call", type=int, default=16)
    p.add_argument("--fault", choices=["kill", "term"], default="kill", help="SIGKILL or SIGTERM replica A")
    p.add_argument("--fault-after", type=int, default=None, help="calls answered before the fault (default: 1/3)")
    p.add_argument("--replica-arg", action="append", default=[], metavar="ARG", help="extra reward-serve argument")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.data is None:
        args.data = DEMO if args.smoke else HUB_DATA
    if args.fault_after is None:
        args.fault_after = args.threads * args.calls // 3
    return args


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from bench.run import resolve_checkpoint
    from service.client import RetryPolicy, RewardClient

    pool = load_pool(512, *load_rows(args.data, data_dir=args.data_dir, split=args.split))
    checkpoint = resolve_checkpoint(args, scratch)
    total = args.threads * args.calls
    # The machine's cores split between the two replicas: one inference worker with one torch thread each.
    extra = ["--inference-workers", "1", "--torch-threads", "1", *args.replica_arg]
    replicas = [
        Server(name, service_argv(checkpoint, args.dtype, extra), scratch / f"{name}.log").launch() for name in "ab"
    ]
    try:
        for replica in replicas:
            replica.wait_ready()
        victim, survivor = replicas
        victim_port = httpx.URL(victim.url).port
        transport = RecordingTransport()
        client = RewardClient([r.url for r in replicas], transport=transport, timeout=120, retry=RetryPolicy())
        calls: list[tuple[float, float, int, str | None]] = []  # start, end, scores returned, error
        done = threading.Condition()

        def call(i: int) -> None:
            items = [pool.items[(i * args.texts_per_call + j) % len(pool.items)] for j in range(args.texts_per_call)]
            started, error, n = time.monotonic(), None, 0
            try:
                n = len(client.score(items).scores)
            except Exception as exc:  # counted and reported
                error = f"{type(exc).__name__}: {exc}"
            with done:
                calls.append((started, time.monotonic(), n, error))
                done.notify_all()

        cpu_start = [cpu_seconds(r.pid) for r in replicas]
        began = time.monotonic()
        with ThreadPoolExecutor(args.threads) as workers:
            futures = [workers.submit(call, i) for i in range(total)]
            with done:
                done.wait_for(lambda: len(calls) >= args.fault_after)
            fault_at = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL if args.fault == "kill" else signal.SIGTERM)
            for future in futures:
                future.result()
        ended = time.monotonic()
        survivor_cpu = cpu_seconds(survivor.pid) - cpu_start[1]
        victim_cpu = cpu_seconds(victim.pid) - cpu_start[0]  # not reaped yet: /proc still has its times
        client.close()
        victim_exit = victim.proc.wait(60)
    finally:
        for replica in replicas:
            replica.stop()

    texts_before = sum(n for s, e, n, _ in calls if e <= fault_at)
    texts_after = sum(n for s, e, n, _ in calls if e > fault_at)
    after = [a for a in transport.at(victim_port) if a.ended > fault_at]
    failed = [a for a in after if a.outcome != 200]
    return {
        "machine": describe_machine(),
        "checkpoint": str(checkpoint),
        "texts": pool.source,
        "setup": {
            "replicas": 2,
            "replica_args": extra,
            "dtype": args.dtype,
            "threads": args.threads,
            "calls": total,
            "texts_per_call": args.texts_per_call,
            "fault": "SIGKILL" if args.fault == "kill" else "SIGTERM",
            "fault_after_calls": args.fault_after,
        },
        "answered": sum(1 for *_, n, err in calls if err is None and n == args.texts_per_call),
        "errors": [err for *_, err in calls if err is not None][:5],
        "victim_exit_code": victim_exit,
        "texts_per_s_before": texts_before / (fault_at - began),
        # Throughput on a machine shared with other work understates what a replica does alone; texts per CPU
        # second of the replicas does not (as long as it is the replicas' own work that is counted).
        "replica_cpu_s": victim_cpu + survivor_cpu,
        "texts_per_cpu_s": (texts_before + texts_after) / (victim_cpu + survivor_cpu),
        "texts_per_s_after": texts_after / (ended - fault_at),
        "latency_before": summary([e - s for s, e, _, _ in calls if e <= fault_at]),
        "latency_from_fault": summary([e - s for s, e, _, _ in calls if e > fault_at]),
        "dead_replica": {
            "requests_after_fault": len(after),
            "answered_200": len(after) - len(failed),
            "outcomes": dict(collections.Counter(str(a.outcome) for a in after)),
            "seconds_in_failed_requests": sum(a.ended - a.started for a in failed),
            "slowest_failed_request_s": max((a.ended - a.started for a in failed), default=None),
            "refused_median_s": percentile([a.ended - a.started for a in failed if a.outcome == "ConnectError"], 0.5),
            "last_request_s_after_fault": max((a.started - fault_at for a in after), default=None),
            "run_s_after_fault": ended - fault_at,
        },
        "attempts": [asdict(a) for a in transport.attempts] if args.json else None,
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def print_report(r: dict[str, Any]) -> None:
    m, s, dead = r["machine"], r["setup"], r["dead_replica"]
    print(
        f"machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs ({', '.join(m.get('cpu_flags', []))}); "
        f"torch {m.get('torch', '?')}"
    )
    print(
        f"setup: 2 replicas of {r['checkpoint']} ({s['dtype']}; {' '.join(s['replica_args'])}), "
        f"{s['threads']} threads, {s['calls']} calls x {s['texts_per_call']} texts of {r['texts']}; "
        f"{s['fault']} of replica A after {s['fault_after_calls']} calls"
    )
    print(f"answered: {r['answered']} of {s['calls']} calls with every score; errors: {r['errors'] or 'none'}")
    print(
        f"throughput: {r['texts_per_s_before']:.1f} texts/s before the fault (two replicas), "
        f"{r['texts_per_s_after']:.1f} after (one); replica A exited with {r['victim_exit_code']}; "
        f"{r['texts_per_cpu_s']:.1f} texts per CPU second of the replicas ({r['replica_cpu_s']:.1f} CPU s)"
    )
    for name, key in (("before the fault", "latency_before"), ("from the fault on", "latency_from_fault")):
        lat = r[key]
        print(
            f"call latency {name}: {lat['calls']} calls, p50 {_ms(lat['p50_s'])}, p99 {_ms(lat['p99_s'])}, "
            f"max {_ms(lat['max_s'])}"
        )
    print(
        f"dead replica: {dead['requests_after_fault']} requests still sent to it or in flight after the fault "
        f"({dead['outcomes']}); {_ms(dead['seconds_in_failed_requests'])} spent in the failed ones in all "
        f"(slowest {_ms(dead['slowest_failed_request_s'])}; a refused connection: median "
        f"{_ms(dead['refused_median_s'])}); the last one sent "
        f"{dead['last_request_s_after_fault'] or 0:.2f} s after the fault, in a run that went on "
        f"{dead['run_s_after_fault']:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as scratch:
        report = run(args, Path(scratch))
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["answered"] == report["setup"]["calls"] else 1


if __name__ == "__main__":
    sys.exit(main())
