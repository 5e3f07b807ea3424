"""Soak test for ``reward-serve``: steady load for a long time, watching memory, latency and every answer.

    python -m bench.soak --model CHECKPOINT [--duration-s 600] [--clients 4] [--rate 10] [--json-out soak.json]
    python -m bench.soak --url http://127.0.0.1:8000 [--pid PID] ...

Starts ``reward-serve`` on the checkpoint (127.0.0.1, a free port, ``--torch-threads 1`` unless told otherwise) or
uses a running server (``--url``; with ``--pid`` its memory is sampled too). ``--clients`` concurrent clients send
``/score`` requests at a bounded total rate (``--rate`` per second): a mix of 1-text and ``--big-items``-text
requests (``--big-fraction`` of them), texts of varied length from a fixed seed. Every answer is checked (a 200
must hold one finite score per text). The server's resident memory is sampled every ``--rss-every-s`` seconds
(psutil) and ``/healthz`` is timed once a second. Per window (``--window-s``, one
minute by default) it reports requests, throughput, latency percentiles, ``/healthz`` p99, memory and statuses; then
the drift from the first to the last full window, the peak memory, and the errors by status, as a table and as JSON.

Nothing may be lost: the exit status is 1 if any request got a 5xx, no answer (connection error, client timeout),
a malformed 200, if the server's own request count disagrees with the client's (managed server only), if the
managed server does not exit 0 on SIGTERM afterwards, or if memory grew more than ``--max-rss-growth-mb`` (when
given). 429s are counted and reported, not failures. Load goes to 127.0.0.1 unless ``--url`` says otherwise.

Not part of CI (tests/test_soak_smoke.py runs it for a few seconds against a tiny checkpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import Server

WORDS = [
    "the",
    "a",
    "is",
    "are",
    "was",
    "to",
    "of",
    "and",
    "or",
    "not",
    "in",
    "on",
    "at",
    "for",
    "with",
    "this",
    "that",
    "it",
    "you",
    "we",
    "they",
    "good",
    "bad",
    "great",
    "terrible",
    "helpful",
    "answer",
    "question",
    "please",
    "thanks",
    "sorry",
    "sure",
    "here",
    "there",
    "what",
    "why",
    "how",
    "two",
    "four",
    "five",
    "plus",
    "equals",
    "math",
    "cat",
    "dog",
    "sky",
    "blue",
    "red",
    "green",
    "hello",
    "world",
    "user",
    "assistant",
    "short",
    "long",
    "text",
    "model",
    "reward",
    "policy",
    "sample",
    "response",
    "prompt",
]


# -- measurements ----------------------------------------------------------------------------------------------------
@dataclass
class Record:
    sent_at: float  # seconds since the load started
    latency_s: float
    items: int
    status: int | None  # None: no answer (connection error, client timeout)
    problem: str | None = None  # a malformed 200, or the transport error


@dataclass
class Samples:
    records: list[Record] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)
    healthz: list[tuple[float, float | None]] = field(default_factory=list)  # (seconds since start, latency s)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    return float(np.percentile(values, q, method="inverted_cdf"))


def read_rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB; None once it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def score_requests_by_code(metrics_text: str) -> Counter:
    """reward_requests_total{route="/score", code=...} from a Prometheus exposition."""
    counts: Counter = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "reward_requests_total" and sample.labels.get("route") == "/score":
                counts[sample.labels["code"]] += int(sample.value)
    return counts


def service_server(model: str, extra_args: list[str], log_path: Path, torch_threads: int) -> Server:
    """``python -m service.cli`` on 127.0.0.1 with a free port; its log goes to ``log_path``."""
    argv = [sys.executable, "-m", "service.cli", "--model", model, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--torch-threads", str(torch_threads), *extra_args]
    return Server("reward-serve", argv, log_path, env={"TOKENIZERS_PARALLELISM": "false"})


# -- the load ----------------------------------------------------------------------------------------------------------
def make_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))) + rng.choice([".", "?", "!"])


async def run_load(args: argparse.Namespace, url: str, pid: int | None) -> Samples:
    samples = Samples()
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    started = time.monotonic()
    end = started + args.duration_s
    next_slot = 0

    def claim_slot() -> float | None:
        """When this client may send its next request (a global schedule of --rate per second), or None: done."""
        nonlocal next_slot
        at = started + next_slot / args.rate
        next_slot += 1
        return at if at < end else None

    async def client(http: httpx.AsyncClient) -> None:
        while (at := claim_slot()) is not None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            n = args.big_items if rng.random() < args.big_fraction else 1
            body = {"items": [{"text": make_text(rng)} for _ in range(n)]}
            sent = time.monotonic()
            status, problem = None, None
            try:
                response = await http.post("/score", json=body, headers=headers)
                status = response.status_code
                if status == 200:
                    scores = response.json().get("scores")
                    if not (
                        isinstance(scores, list)
                        and len(scores) == n
                        and all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores)
                    ):
                        problem = f"malformed 200: {response.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            samples.records.append(Record(sent - started, time.monotonic() - sent, n, status, problem))

    async def watch(http: httpx.AsyncClient) -> None:
        tick = 0
        while (now := time.monotonic()) < end:
            if pid is not None and tick % max(1, round(args.rss_every_s)) == 0:
                rss = read_rss_mib(pid)
                if rss is not None:
                    samples.rss.append((now - started, rss))
            t0 = time.monotonic()
            try:
                ok = (await http.get("/healthz", timeout=10)).status_code == 200
                samples.healthz.append((t0 - started, time.monotonic() - t0 if ok else None))
            except httpx.HTTPError:
                samples.healthz.append((t0 - started, None))
            tick += 1
            await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
        if pid is not None and (rss := read_rss_mib(pid)) is not None:
            samples.rss.append((time.monotonic() - started, rss))

    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    async with (
        httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s, limits=limits) as http,
        httpx.AsyncClient(base_url=url, timeout=10) as probe,
    ):
        await asyncio.gather(watch(probe), *(client(http) for _ in range(args.clients)))
    return samples


# -- the report --------------------------------------------------------------------------------------------------------
def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def summarize(samples: Samples, args: argparse.Namespace) -> dict[str, Any]:
    windows = []
    count = max(1, math.ceil(args.duration_s / args.window_s))
    for w in range(count):
        lo, hi = w * args.window_s, min((w + 1) * args.window_s, args.duration_s)
        records = [r for r in samples.records if lo <= r.sent_at < hi]
        latencies = [r.latency_s for r in records if r.status == 200]
        rss = [m for t, m in samples.rss if lo <= t < hi]
        if not rss:  # no sample fell in this window: the latest one before its end stands for it
            rss = [m for t, m in samples.rss if t < hi][-1:]
        probes = [h for t, h in samples.healthz if lo <= t < hi]
        windows.append(
            {
                "window": w,
                "start_s": lo,
                "seconds": hi - lo,
                "partial": hi - lo < args.window_s,
                "requests": len(records),
                "items": sum(r.items for r in records),
                "items_per_s": round(sum(r.items for r in records if r.status == 200) / (hi - lo), 1),
                "latency_ms": {
                    "p50": ms(percentile(latencies, 50)),
                    "p95": ms(percentile(latencies, 95)),
                    "p99": ms(percentile(latencies, 99)),
                    "max": ms(max(latencies, default=None)),
                },
                "healthz_p99_ms": ms(percentile([h for h in probes if h is not None], 99)),
                "healthz_failures": sum(h is None for h in probes),
                "rss_mib": {
                    "first": rss[0] if rss else None,
                    "last": rss[-1] if rss else None,
                    "max": max(rss, default=None),
                },
                "by_status": dict(sorted(Counter(str(r.status or "no answer") for r in records).items())),
            }
        )
    full = [w for w in windows if not w["partial"]] or windows
    first, last = full[0], full[-1]
    all_rss = [m for _, m in samples.rss]
    statuses = Counter(str(r.status or "no answer") for r in samples.records)
    return {
        "windows": windows,
        "totals": {
            "requests": len(samples.records),
            "items": sum(r.items for r in samples.records),
            "by_status": dict(sorted(statuses.items())),
            "server_errors": sum(1 for r in samples.records if r.status is not None and r.status >= 500),
            "no_answer": sum(1 for r in samples.records if r.status is None),
            "malformed_200": sum(1 for r in samples.records if r.status == 200 and r.problem),
            "problems": sorted({r.problem for r in samples.records if r.problem})[:10],
            "healthz_failures": sum(h is None for _, h in samples.healthz),
        },
        "drift": {
            "compared_windows": [first["window"], last["window"]],
            "latency_p50_ms": [first["latency_ms"]["p50"], last["latency_ms"]["p50"]],
            "latency_p99_ms": [first["latency_ms"]["p99"], last["latency_ms"]["p99"]],
            "items_per_s": [first["items_per_s"], last["items_per_s"]],
            "rss_mib": [first["rss_mib"]["max"], last["rss_mib"]["max"]],  # peak of each window
            "rss_growth_mib": (
                round(last["rss_mib"]["max"] - first["rss_mib"]["max"], 1)
                if first["rss_mib"]["max"] is not None and last["rss_mib"]["max"] is not None
                else None
            ),
            "rss_max_mib": max(all_rss, default=None),
        },
    }


def print_table(report: dict[str, Any]) -> None:
    def f(x: Any, fmt: str = "{:.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    print(
        f"{'win':>3} {'t(s)':>6} {'req':>6} {'items/s':>8} {'p50ms':>8} {'p95ms':>8} {'p99ms':>8} {'maxms':>8} "
        f"{'hz99ms':>7} {'rss MiB':>8} statuses"
    )
    for w in report["windows"]:
        lat = w["latency_ms"]
        print(
            f"{w['window']:>3} {w['start_s']:>6.0f} {w['requests']:>6} {w['items_per_s']:>8.1f} {f(lat['p50']):>8} "
            f"{f(lat['p95']):>8} {f(lat['p99']):>8} {f(lat['max']):>8} {f(w['healthz_p99_ms']):>7} "
            f"{f(w['rss_mib']['max']):>8} {json.dumps(w['by_status'])}{' (partial)' if w['partial'] else ''}"
        )
    d, t = report["drift"], report["totals"]
    print(
        f"drift (window {d['compared_windows'][0]} -> {d['compared_windows'][1]}): "
        f"p50 {f(d['latency_p50_ms'][0])} -> {f(d['latency_p50_ms'][1])} ms, "
        f"p99 {f(d['latency_p99_ms'][0])} -> {f(d['latency_p99_ms'][1])} ms, "
        f"items/s {f(d['items_per_s'][0])} -> {f(d['items_per_s'][1])}, "
        f"RSS {f(d['rss_mib'][0])} -> {f(d['rss_mib'][1])} MiB (growth {f(d['rss_growth_mib'])}, "
        f"max {f(d['rss_max_mib'])})"
    )
    print(
        f"totals: {t['requests']} requests, {t['items']} items, statuses {json.dumps(t['by_status'])}, "
        f"5xx {t['server_errors']}, no answer {t['no_answer']}, malformed 200 {t['malformed_200']}"
    )
    print("result:", "OK" if report["ok"] else "FAILED: " + "; ".join(report["failures"]))


# -- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint folder: start reward-serve on it")
    target.add_argument("--url", help="a running server instead")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its memory")
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--window-s", type=float, default=60.0, help="reporting window")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second, all clients together (a ceiling)")
    p.add_argument("--big-items", type=int, default=16, help="texts in a big request")
    p.add_argument("--big-fraction", type=float, default=0.25, help="fraction of requests that are big")
    p.add_argument("--rss-every-s", type=float, default=5.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="client-side timeout per request")
    p.add_argument("--max-rss-growth-mb", type=float, default=None, help="fail if memory grew more than this")
    p.add_argument("--torch-threads", type=int, default=1, help="for the managed server")
    p.add_argument("--server-args", default="", help="more reward-serve flags for the managed server (one string)")
    p.add_argument("--api-key", default=None, help="sent as a bearer token (and given to the managed server)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None, help="write the report here as JSON")
    p.add_argument(
        "--server-log",
        type=Path,
        default=None,
        help="the managed server's log (default: next to --json-out, else a temporary file)",
    )
    args = p.parse_args(argv)
    if args.rate <= 0 or args.clients < 1 or args.duration_s <= 0 or args.window_s <= 0:
        p.error("--rate, --clients, --duration-s and --window-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server: Server | None = None
    before: Counter = Counter()
    if args.model:
        log_path = args.server_log or (
            args.json_out.with_suffix(".server.log")
            if args.json_out
            else Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{os.getpid()}.log"
        )
        extra = shlex.split(args.server_args) + (["--api-key", args.api_key] if args.api_key else [])
        server = service_server(args.model, extra, log_path, args.torch_threads).start(timeout=300)
        url, pid = server.url, server.pid
        print(f"reward-serve pid {pid} at {url}; log {log_path}", flush=True)
    else:
        url, pid = args.url.rstrip("/"), args.pid
    assert url is not None
    try:
        before = score_requests_by_code(httpx.get(url + "/metrics", timeout=10).text)
    except httpx.HTTPError:
        before = Counter()
    print(
        f"soak: {args.duration_s:g} s, {args.clients} clients, at most {args.rate:g} requests/s "
        f"({args.big_fraction:.0%} with {args.big_items} texts)",
        flush=True,
    )
    failures: list[str] = []
    exit_code = None
    try:
        samples = asyncio.run(run_load(args, url, pid))
        try:
            after = score_requests_by_code(httpx.get(url + "/metrics", timeout=10).text)
        except httpx.HTTPError as exc:
            after = None
            failures.append(f"/metrics unreachable after the load ({exc.__class__.__name__})")
    finally:
        if server is not None:
            exit_code = server.stop()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"},
        "server": {
            "url": url,
            "pid": pid,
            "managed": server is not None,
            "command": server.argv if server else None,
            "exit_code": exit_code,
            "log": str(server.log_path) if server else None,
        },
        **summarize(samples, args),
    }
    totals = report["totals"]
    client_counts = Counter(str(r.status) for r in samples.records if r.status is not None)
    if after is not None:
        counted = after - before
        report["server_counted"] = dict(sorted(counted.items()))
        if server is not None and counted != client_counts:
            failures.append(
                f"the server counted {dict(counted)} /score requests, the clients got {dict(client_counts)}"
            )
    if totals["server_errors"]:
        failures.append(f"{totals['server_errors']} requests got a 5xx")
    if totals["no_answer"]:
        failures.append(f"{totals['no_answer']} requests got no answer")
    if totals["malformed_200"]:
        failures.append(f"{totals['malformed_200']} malformed 200s")
    if server is not None and exit_code != 0:
        failures.append(f"reward-serve exited with {exit_code} on SIGTERM")
    growth = report["drift"]["rss_growth_mib"]
    if args.max_rss_growth_mb is not None and growth is not None and growth > args.max_rss_growth_mb:
        failures.append(f"memory grew {growth} MiB (limit {args.max_rss_growth_mb})")
    if not samples.records:
        failures.append("no request was sent")
    report["ok"], report["failures"] = not failures, failures
    print_table(report)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json_out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
