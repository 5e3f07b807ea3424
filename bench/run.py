"""``python -m bench``: the throughput benchmark, every scenario in one run on one checkpoint, dtype and text pool.

    python -m bench [--checkpoint DIR] [--dtype float32[,bfloat16]] [--texts 512] [--duration-s 20] [--smoke]

For each dtype, in this order, with nothing else of ours running at the same time:

1. ``ceiling``: the model called in-process through the service's own forward (``--backend``: ONNX Runtime or
   torch, as the service picks it) on length-sorted batches, at several batch sizes (the best one is the
   ceiling), plus two references: one text at a time, and unsorted 64-text batches padded to their longest; the
   best size is timed again after every load scenario, and each scenario is compared with the ceiling timings just
   before and after it (this machine's speed drifts over minutes);
2. ``service_64x1``: ``reward-serve`` under 64 closed-loop clients sending one text each (OpenRLHF's pattern);
3. ``service_4x64``: the service under 4 clients sending 64-text requests (GRPO's pattern);
4. ``service_open``: the service at a fixed arrival rate of one-text requests (half the ceiling by default), for
   latency percentiles under a load it can sustain;
5. ``naive_64x1``, ``naive_4x64``, ``naive_open``: the same three against :mod:`bench.naive_server`, a server
   built the way OpenRLHF's ``serve_rm`` is;
6. ``vllm_64x1``, ``vllm_4x64``, ``vllm_open`` (only when asked for in ``--scenarios``): the same loads against
   vLLM's OpenAI-compatible server (``/classify``, raw logits) started from the peer venv that ``make bench-peers``
   builds. They run interleaved with the service's: service_64x1, vllm_64x1, service_4x64, vllm_4x64, ...,
   ``--repeats`` times, both servers up throughout, so that drift and others' load fall on both alike.

Reports texts/s, real tokens/s, p50/p95/p99 latency, mean items and padding efficiency per forward (the service's
``/metrics``), CPU use of the server, of this process and of everyone else on the machine, and the ratios to the
ceiling and to the naive server, to ``--output`` (``bench/results/``) as ``bench.json``, ``bench.md`` and
``bench.png``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load as loadgen
from bench.procstat import CpuProbe, describe_machine, sample_machine, wait_quiet
from bench.report import CONTAMINATED_CORES, cpu_line
from bench.servers import (
    PEERS_PYTHON,
    Server,
    batch_stats,
    naive_argv,
    parse_metrics,
    service_argv,
    vllm_argv,
    vllm_env,
)
from bench.texts import DEFAULT_DATA, TextPool, held_out_pairs, load_pool

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "bench-minilm"
DEFAULT_OUTPUT = REPO / "bench" / "results"

SERVICE_SCENARIOS = ("service_64x1", "service_4x64", "service_open")
NAIVE_SCENARIOS = ("naive_64x1", "naive_4x64", "naive_open")
VLLM_SCENARIOS = ("vllm_64x1", "vllm_4x64", "vllm_open")
DEFAULT_SCENARIOS = ("ceiling",) + SERVICE_SCENARIOS + NAIVE_SCENARIOS
ALL_SCENARIOS = DEFAULT_SCENARIOS + VLLM_SCENARIOS

# The project's performance goals, checked in every report (MiniLM reward model on a CPU, fp32 unless said).
TARGETS = {
    "service_64x1_vs_ceiling": 0.90,
    "service_4x64_vs_ceiling": 0.95,
    "service_4x64_vs_naive": 3.0,
    "service_64x1_vs_naive": 1.0,
    "bf16_vs_fp32": 1.7,
    "bf16_accuracy_points": 0.5,
}


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"reward checkpoint to serve (default: {DEFAULT_CHECKPOINT.relative_to(REPO)}, trained for 5 "
        "steps from the default base model when absent: the speed is the trained model's)",
    )
    p.add_argument(
        "--dtype", default="float32", help="comma-separated dtypes, each benchmarked in full (e.g. float32,bfloat16)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="the service's forward (--backend of reward-serve, default auto as there); the ceiling uses the same",
    )
    p.add_argument("--texts", type=int, default=512, help="size of the text pool (default 512)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="hh-rlhf jsonl (demo pairs when absent)")
    p.add_argument("--duration-s", type=float, default=20.0, help="measured seconds per load scenario")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each load scenario")
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {', '.join(ALL_SCENARIOS)} (default: all but vllm_*)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with vllm_* scenarios: how many times each service/vLLM pair runs, interleaved (the second run of "
        "service_64x1 is reported as service_64x1#2)",
    )
    p.add_argument(
        "--peer-python",
        type=Path,
        default=PEERS_PYTHON,
        help="the Python of the venv with vLLM (default .venv-peers/bin/python, made by `make bench-peers`)",
    )
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="extra vLLM server argument")
    p.add_argument("--ceiling-batch-sizes", default="4,8,16,32,64", help="sorted batch sizes of the ceiling sweep")
    p.add_argument(
        "--ceiling-workers",
        default="1,2",
        help="numbers of forward threads the ceiling sweep tries with each batch size, torch's threads "
        "divided among them (the service's --inference-workers; default 1,2)",
    )
    p.add_argument(
        "--ceiling-references",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time one text at a time and unsorted batches (default); --no-ceiling-references skips them",
    )
    p.add_argument(
        "--ceiling-min-s",
        type=float,
        default=None,
        help="time each sorted ceiling batch size for at least this long (default: half of --duration-s)",
    )
    p.add_argument("--rate", type=float, default=None, help="open-loop arrivals per second (default: --rate-fraction)")
    p.add_argument("--rate-fraction", type=float, default=0.5, help="open-loop rate as a fraction of the ceiling")
    p.add_argument("--clients", type=int, default=64, help="one-text clients (default 64)")
    p.add_argument("--batch-clients", type=int, default=4, help="batch clients (default 4)")
    p.add_argument("--batch-texts", type=int, default=64, help="texts per batch request (default 64)")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw", help="load generator's HTTP client")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra reward-serve argument (repeatable; --server-arg=--max-batch-size --server-arg=16)",
    )
    p.add_argument(
        "--service-root",
        type=Path,
        default=None,
        help="run reward-serve from this folder (a copy of the repository with a modified service/, to "
        "measure a change before making it); default: this checkout",
    )
    p.add_argument(
        "--service-url",
        default=None,
        help="measure an already running service instead of starting one (e.g. to profile it)",
    )
    p.add_argument("--service-pid", type=int, default=None, help="its process id, for the CPU columns")
    p.add_argument("--naive-arg", action="append", default=[], metavar="ARG", help="extra naive-server argument")
    p.add_argument(
        "--accuracy-pairs",
        type=int,
        default=None,
        help="held-out pairs scored in-process per dtype to compare accuracy across dtypes "
        "(default 300 with several dtypes, else 0)",
    )
    p.add_argument(
        "--wait-quiet-s",
        type=float,
        default=0.0,
        help="before each measurement, wait up to this long for the rest of the machine to use under "
        "0.3 cores for 10 s (shared machines); 0 (default) does not wait",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="with --wait-quiet-s: how many times a measurement during which others used the CPU is "
        "taken again (default 2)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder (default bench/results)")
    p.add_argument("--label", default=None, help="a note stored with the results (e.g. what was changed)")
    p.add_argument(
        "--smoke", action="store_true", help="seconds-long run on a tiny random model (CI): few texts, 1 s per scenario"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.texts = min(args.texts, 48)
        args.duration_s = min(args.duration_s, 1.0)
        args.warmup_s = min(args.warmup_s, 0.3)
        args.ceiling_batch_sizes = "4,8"
        args.clients = min(args.clients, 16)
        args.batch_texts = min(args.batch_texts, 16)
    if args.ceiling_min_s is None:
        args.ceiling_min_s = args.duration_s / 2
    args.min_requests = 2 if args.smoke else 1
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(ALL_SCENARIOS)}")
    if any(n in VLLM_SCENARIOS for n in args.scenario_list) and not args.peer_python.is_file():
        p.error(f"vllm scenarios need vLLM in {args.peer_python}: run `make bench-peers` (or pass --peer-python)")
    if args.accuracy_pairs is None:
        args.accuracy_pairs = 300 if len(args.dtypes) > 1 and not args.smoke else 0
    return args


# -- the checkpoint ----------------------------------------------------------------------------------------------
def resolve_checkpoint(args: argparse.Namespace, scratch: Path) -> Path:
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise SystemExit(f"bench: --checkpoint {args.checkpoint}: no such folder")
        return args.checkpoint
    if args.smoke:
        from bench.tiny import make_tiny_checkpoint

        return make_tiny_checkpoint(scratch / "tiny-bert")
    if (DEFAULT_CHECKPOINT / "reward_manifest.json").is_file():
        return DEFAULT_CHECKPOINT
    data = str(args.data) if args.data and Path(args.data).is_file() else "demo"
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--dataset_name",
        data,
        "--output_dir",
        str(DEFAULT_CHECKPOINT),
        "--max_steps",
        "5",
        "--report_to",
        "none",
        "--seed",
        "0",
    ]
    log("no checkpoint given: training one for the benchmark (5 steps; the speed is the trained model's)")
    log(f"$ {' '.join(cmd)}")
    subprocess.run(cmd, cwd=REPO, check=True)
    return DEFAULT_CHECKPOINT


def check_peer_scores(server: Server, pool: TextPool, checkpoint: Any, n: int = 16) -> dict[str, Any]:
    """The peer's scores for the first ``n`` texts against the checkpoint's own (in-process, torch): the same model
    must give the same scores, or the comparison is not of like with like."""
    import urllib.request

    from training.checkpoint import forward_scores

    items = pool.items[:n]
    body = json.dumps(
        {
            "model": "rm",
            "input": [loadgen.item_text(i) for i in items],
            "use_activation": False,
            "truncate_prompt_tokens": pool.max_length,
        }
    ).encode()
    request = urllib.request.Request(server.url + "/classify", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        data = json.loads(response.read())
    got = [row["probs"][0] for row in data["data"]]
    encoded = [checkpoint.formatter.encode(i) for i in items]
    want = [forward_scores(checkpoint, [e.input_ids])[0] for e in encoded]
    diffs = [abs(a - b) for a, b in zip(got, want, strict=True)]
    whole = [d for d, e in zip(diffs, encoded, strict=True) if not e.truncated]
    cut = [d for d, e in zip(diffs, encoded, strict=True) if e.truncated]
    result = {
        "texts": len(items),
        "max_abs_diff": max(whole, default=None),  # texts within the max length: the same tokens on both sides
        "truncated_texts": len(cut),
        "max_abs_diff_truncated": max(cut, default=None),  # vLLM cuts long texts elsewhere than the recipe does
    }
    log(
        f"  vllm scores vs the checkpoint's: largest difference {result['max_abs_diff']} over {len(whole)} whole "
        f"texts, {result['max_abs_diff_truncated']} over {len(cut)} truncated ones"
    )
    return result


# -- scenarios ---------------------------------------------------------------------------------------------------
def tokenize_pool(pool: TextPool, checkpoint: Any) -> list[list[int]]:
    encoded = [checkpoint.formatter.encode(item) for item in pool.items]
    pool.lengths = [len(e.input_ids) for e in encoded]
    pool.truncated = sum(e.truncated for e in encoded)
    pool.max_length = checkpoint.formatter.recipe.max_length
    return [e.input_ids for e in encoded]


class ServiceForwards:
    """The forward the service runs (``--backend``, chosen as the service chooses it), made once per worker layout:
    an ONNX Runtime session has its thread count fixed when it is made (all threads for one worker, one each for
    two), as the service's workers have. Called with a number of workers, as the ceiling's ``forward_for``."""

    def __init__(self, checkpoint: Any, backend: str):
        self.checkpoint, self.backend = checkpoint, backend
        self.made: dict[int, Any] = {}
        self.info: dict[str, Any] = {}

    def __call__(self, workers: int):
        import torch

        from bench.ceiling import torch_forward
        from service.backend import choose_runner, model_version

        if workers not in self.made:
            total = torch.get_num_threads()
            torch.set_num_threads(max(1, total // workers))  # the session takes the calling thread's count
            try:
                version = model_version(Path(self.checkpoint.path), self.checkpoint.manifest)
                runner, self.info = choose_runner(self.checkpoint, version, self.backend)
            finally:
                torch.set_num_threads(total)
            self.made[workers] = runner or torch_forward(self.checkpoint)
        return self.made[workers]

    def describe(self) -> str:
        graph = self.info.get("onnx_graph")
        return f"{self.info.get('backend', 'torch')} ({graph} graph)" if graph else self.info.get("backend", "torch")


def scores_vs_torch(checkpoint: Any, sequences: list[list[int]], forward: Any, name: str) -> dict[str, Any]:
    """The served forward's scores for every text of the pool against transformers' on the same checkpoint: a
    faster forward counts only if it scores what the trained model scores (the service's tolerance is 1e-5)."""
    from bench.ceiling import _batches_sorted
    from training.checkpoint import forward_scores

    worst = 0.0
    for batch in _batches_sorted([len(s) for s in sequences], 8):
        texts = [sequences[i] for i in batch]
        got, want = forward(texts), forward_scores(checkpoint, texts)
        worst = max(worst, *(abs(a - b) for a, b in zip(got, want, strict=True)))
    return {"forward": name, "texts": len(sequences), "max_abs_diff": worst}


def run_ceiling(
    args: argparse.Namespace, checkpoint: Any, sequences: list[list[int]], forwards: ServiceForwards
) -> dict[str, Any]:
    from bench.ceiling import layout, measure

    sizes = [int(x) for x in args.ceiling_batch_sizes.split(",") if x.strip()]
    workers = [int(x) for x in args.ceiling_workers.split(",") if x.strip()]
    result = measure(
        checkpoint,
        sequences,
        forward_for=forwards,
        batch_sizes=sizes,
        workers=workers,
        references=args.ceiling_references,
        unsorted_size=args.batch_texts,
        log=log,
        before_pass=lambda: quiet(args),
        retries=args.retries if args.wait_quiet_s > 0 else 0,
        contaminated=CONTAMINATED_CORES,
        min_seconds=args.ceiling_min_s,
    )
    best = result["ceiling"]
    if forwards.info.get("backend", "torch") != "torch":
        result["scores_vs_torch"] = scores_vs_torch(checkpoint, sequences, forwards(1), forwards.describe())
        log(
            f"  {forwards.describe()} scores vs torch's: largest difference {result['scores_vs_torch']['max_abs_diff']}"
        )
    return {
        "kind": "in-process",
        "description": f"model called directly through the service's {forwards.describe()} forward, "
        f"length-sorted batches of {best['batch_size']}, {layout(best['workers'])} (best of the sweep)",
        "forward": forwards.info,
        "texts_per_s": best["texts_per_s"],
        "tokens_per_s": best["tokens_per_s"],
        "latency_ms": None,
        "mean_items_per_forward": best["mean_items_per_forward"],
        "padding_efficiency": best["padding_efficiency"],
        "forward_busy": best["forward_busy"],
        "forward_padded_tokens_per_s": best["forward_padded_tokens_per_s"],
        "cpu": best["cpu"],
        **result,
    }


def accuracy_check(checkpoint: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from training.evaluate import evaluate_pairs

    report = evaluate_pairs(checkpoint, rows)
    return {
        "accuracy": report["accuracy"],
        "mean_margin": report["mean_margin"],
        "n": report["n"],
        "chosen_scores": report["chosen_scores"],
        "rejected_scores": report["rejected_scores"],
    }


def run_load(args: argparse.Namespace, server: Server, name: str, pool: TextPool, rate: float | None) -> dict[str, Any]:
    which, kind = name.split("#", 1)[0].split("_", 1)
    lengths = pool.lengths or [0] * len(pool.items)
    api = "vllm" if which == "vllm" else "service"
    url = server.url + ("/classify" if api == "vllm" else "/score")

    def scrape() -> dict[str, float]:
        return parse_metrics(server.get("/metrics"))

    def build(per_request: int) -> list[loadgen.Payload]:
        return loadgen.build_payloads(pool.items, lengths, per_request, api=api, max_length=pool.max_length)

    if kind in ("64x1", "4x64"):
        clients, per_request = (args.clients, 1) if kind == "64x1" else (args.batch_clients, args.batch_texts)
        payloads = build(per_request)
        coro = functools.partial(
            loadgen.closed_loop,
            url,
            payloads,
            concurrency=clients,
            warmup_s=args.warmup_s,
            duration_s=args.duration_s,
            client=args.client,
            min_requests=args.min_requests,
            scrape=scrape,
        )
        texts = "1 text" if per_request == 1 else f"{per_request} texts"
        description = f"{clients} closed-loop clients x {texts} per request"
    else:
        payloads = build(1)
        assert rate is not None
        coro = functools.partial(
            loadgen.open_loop,
            url,
            payloads,
            rate=rate,
            warmup_s=args.warmup_s,
            duration_s=args.duration_s,
            client=args.client,
            scrape=scrape,
        )
        description = f"open loop: one-text requests at a fixed {rate:.1f}/s"
    pids = server.process_tree()  # vLLM computes in child processes: their CPU is the server's, not others'
    quiet(args, pids)
    before = parse_metrics(server.get("/metrics"))
    probe = CpuProbe(pids)
    result = loadgen.run(coro)
    cpu = probe.stop()
    after = parse_metrics(server.get("/metrics"))
    summary = result.summary()
    stats = None
    if len(result.snapshots) == 2:  # the measurement window itself, not the warm-up
        (t0, window_start), (t1, window_end) = result.snapshots
        stats = batch_stats(window_start, window_end, seconds=t1 - t0)
    if stats is None or stats.get("mean_items_per_forward") is None:
        # no window snapshots, or no forward ended inside a very short window: the whole run, warm-up included
        stats = batch_stats(before, after, seconds=cpu["wall_s"])
    out = {"kind": which, "description": description, **summary, **stats, "cpu": cpu}
    if rate is not None and kind == "open":
        out["offered_rate"] = rate
    lat = out["latency_ms"]
    log(
        f"  {name:<13} {out['texts_per_s']:7.1f} texts/s  p50 {lat['p50']} ms  p99 {lat['p99']} ms  "
        f"items/forward {_fmt(out['mean_items_per_forward'])}  padding eff {_fmt(out['padding_efficiency'])}  "
        f"forward busy {_fmt(out.get('forward_busy'))}  "
        f"errors {out['errors'] or 0}  cpu {cpu}"
    )
    return out


def _clean(args: argparse.Namespace, measure, name: str) -> dict[str, Any]:
    """With --wait-quiet-s, measure again (up to --retries times) when others used the CPU meanwhile."""
    tries = 1 + (args.retries if args.wait_quiet_s > 0 else 0)
    attempts = 0
    for _ in range(tries):
        attempts += 1
        result = measure()
        others = (result.get("cpu") or {}).get("others_cores") or 0.0
        if others <= CONTAMINATED_CORES or attempts == tries:
            break
        log(f"  {name}: others used {others:.2f} cores meanwhile; measuring again")
    result["attempts"] = attempts
    return result


def _root(args: argparse.Namespace, which: str) -> Path | None:
    return args.service_root if which == "service" else None


def quiet(args: argparse.Namespace, own_pids: Sequence[int] = ()) -> None:
    if args.wait_quiet_s > 0:
        wait_quiet(args.wait_quiet_s, own_pids=own_pids, log=log)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_dtype(args: argparse.Namespace, checkpoint_dir: Path, dtype: str, pool: TextPool, logs: Path) -> dict[str, Any]:
    log(f"== dtype {dtype}")
    servers = {
        "service": (
            SERVICE_SCENARIOS,
            service_argv(checkpoint_dir, dtype, ["--backend", args.backend, *args.server_arg]),
        ),
        "naive": (NAIVE_SCENARIOS, naive_argv(checkpoint_dir, dtype, args.naive_arg)),
    }
    early: dict[str, Server] = {}
    if any(n in args.scenario_list for n in VLLM_SCENARIOS):
        argv = vllm_argv(checkpoint_dir, dtype, _max_length(checkpoint_dir), args.peer_python, args.vllm_arg)
        servers["vllm"] = (VLLM_SCENARIOS, argv)
        # Its first start compiles for a minute or more: started now, ready by the time the ceiling is measured.
        early["vllm"] = Server("vllm", argv, logs / f"vllm-{dtype}.log", env=vllm_env(), ready_path="/health")
        early["vllm"].launch()
    if args.smoke:  # numbers do not matter: start both servers now, in parallel with the ceiling, to save time
        for which, (names, argv) in servers.items():
            if any(n in args.scenario_list for n in names) and not (which == "service" and args.service_url):
                early[which] = Server(which, argv, logs / f"{which}-{dtype}.log", root=_root(args, which)).launch()
    try:
        return _run_dtype(args, checkpoint_dir, dtype, pool, logs, servers, early)
    finally:
        for server in early.values():
            server.stop()


def _max_length(checkpoint_dir: Path) -> int:
    """The checkpoint's truncation length, for a peer server's maximum model length."""
    from training.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_dir, device="cpu").formatter.recipe.max_length


def _run_dtype(args, checkpoint_dir, dtype, pool, logs, servers, early) -> dict[str, Any]:
    from training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_dir, dtype=dtype, device="cpu")
    forwards = ServiceForwards(checkpoint, args.backend)
    sequences = tokenize_pool(pool, checkpoint)
    scenarios: dict[str, Any] = {}
    out: dict[str, Any] = {"dtype": dtype, "scenarios": scenarios}
    if "vllm" in early:
        t0 = time.perf_counter()
        early["vllm"].wait_ready(timeout=900)  # before any timing: its start compiles on every core
        log(f"  vllm server ready in {time.perf_counter() - t0:.1f} s more at {early['vllm'].url}")
        out["vllm_scores"] = check_peer_scores(early["vllm"], pool, checkpoint)
    if "ceiling" in args.scenario_list:
        scenarios["ceiling"] = run_ceiling(args, checkpoint, sequences, forwards)
    if args.accuracy_pairs:
        rows, source = held_out_pairs(args.accuracy_pairs, data=args.data)
        out["accuracy"] = {**accuracy_check(checkpoint, rows), "source": source}
        log(f"  held-out accuracy ({dtype}): {out['accuracy']['accuracy']:.4f} over {out['accuracy']['n']} pairs")
    ceiling = scenarios.get("ceiling")
    clock = CeilingClock(args, checkpoint, sequences, ceiling, forwards) if ceiling else None
    if clock is None:
        del checkpoint, forwards
        gc.collect()

    ceiling_rate = ceiling["texts_per_s"] if ceiling else None
    rate = args.rate or (args.rate_fraction * ceiling_rate if ceiling_rate else 10.0)
    # With vLLM, the service and vLLM are up together and their scenarios alternate (see the module's docstring).
    groups = [["service", "vllm"], ["naive"]] if "vllm" in servers else [["service"], ["naive"]]
    for group in groups:
        wanted = {w: [n for n in servers[w][0] if n in args.scenario_list] for w in group}
        if not any(wanted.values()):
            continue
        up: dict[str, Server] = {}
        try:
            for which in (w for w in group if wanted[w]):
                argv = servers[which][1]
                t0 = time.perf_counter()
                if which == "service" and args.service_url:
                    up[which] = Server.external(which, args.service_url, args.service_pid)
                elif which in early:
                    up[which] = early[which].wait_ready()
                else:
                    up[which] = Server(which, argv, logs / f"{which}-{dtype}.log", root=_root(args, which)).start()
                log(f"  {which} server ready in {time.perf_counter() - t0:.1f} s at {up[which].url}")
                out[f"{which}_argv"] = argv[1:]
            kinds = [k for k in ("64x1", "4x64", "open") if any(f"{w}_{k}" in wanted[w] for w in up)]
            repeats = args.repeats if len(up) > 1 else 1
            for repeat in range(repeats):
                for kind in kinds:
                    for which, server in up.items():
                        name = f"{which}_{kind}"
                        if name not in wanted[which]:
                            continue
                        key = name if repeat == 0 else f"{name}#{repeat + 1}"
                        scenarios[key] = _clean(args, lambda s=server, k=key: run_load(args, s, k, pool, rate), key)
                        if clock is not None:
                            own = [s.pid for s in up.values() if s.pid]
                            scenarios[key]["ceiling_around"] = clock.tick(own)
        finally:
            for server in up.values():
                server.stop()
    if clock is not None:
        clock.summarise()
    out["ratios"] = ratios(scenarios)
    return out


class CeilingClock:
    """The ceiling's batch size timed again after every load scenario, in this process, while the server idles.

    A virtual machine's speed drifts over minutes even with nothing else running, so one ceiling timed before all
    scenarios can be too high or too low for a scenario run minutes later. Each scenario is compared with
    the mean of the ceiling timings just before and just after it; the ceiling row reports the mean of all timings.
    """

    KEYS = ("texts_per_s", "tokens_per_s", "forward_padded_tokens_per_s")

    def __init__(
        self,
        args: argparse.Namespace,
        checkpoint: Any,
        sequences: list[list[int]],
        ceiling: dict[str, Any],
        forwards: ServiceForwards,
    ):
        self.args, self.checkpoint, self.sequences, self.ceiling = args, checkpoint, sequences, ceiling
        self.forwards = forwards
        self.timings = [{k: ceiling["sweep"][ceiling["best"]][k] for k in self.KEYS}]

    def tick(self, own_pids: Sequence[int]) -> dict[str, float]:
        """Time the ceiling now; returns the timings before and after the scenario that just ended, and their mean."""
        from bench.ceiling import remeasure

        quiet(self.args, own_pids)
        best = self.ceiling["sweep"][self.ceiling["best"]]
        result = remeasure(
            self.checkpoint,
            self.sequences,
            best["batch_size"],
            min_seconds=self.args.ceiling_min_s,
            workers=best["workers"],
            forward=self.forwards(best["workers"]),
        )
        self.timings.append({k: result[k] for k in self.KEYS} | {"others_cores": result["cpu"].get("others_cores")})
        before, after = self.timings[-2]["texts_per_s"], self.timings[-1]["texts_per_s"]
        log(f"  ceiling timed again: {after:.1f} texts/s (before the scenario: {before:.1f})")
        return {"before": before, "after": after, "mean": (before + after) / 2}

    def summarise(self) -> None:
        if len(self.timings) < 2:
            return
        for key in self.KEYS:
            self.ceiling[key] = sum(t[key] for t in self.timings) / len(self.timings)
        self.ceiling["timings"] = self.timings
        self.ceiling["description"] += f", mean of {len(self.timings)} timings around the load scenarios"


def ratios(s: dict[str, Any]) -> dict[str, float]:
    def tput(name: str) -> float | None:
        return s[name]["texts_per_s"] if name in s and s[name]["texts_per_s"] else None

    out = {}
    for name in [n for n in s if n != "ceiling"]:
        # the ceiling timed just before and after this scenario, else the ceiling row
        ceiling = s[name]["ceiling_around"]["mean"] if "ceiling_around" in s.get(name, {}) else tput("ceiling")
        if tput(name) and ceiling:
            out[f"{name}_vs_ceiling"] = tput(name) / ceiling
            s[name]["ratio_to_ceiling"] = out[f"{name}_vs_ceiling"]
    for kind in ("64x1", "4x64", "open"):
        a, b = tput(f"service_{kind}"), tput(f"naive_{kind}")
        if a and b:
            out[f"service_{kind}_vs_naive"] = a / b
            s[f"service_{kind}"]["ratio_to_naive"] = a / b
        # Against vLLM: each interleaved pair (service_64x1#2 with vllm_64x1#2), and their median.
        pairs = []
        for suffix in [""] + [f"#{i}" for i in range(2, 100)]:
            a, b = tput(f"service_{kind}{suffix}"), tput(f"vllm_{kind}{suffix}")
            if not (a and b):
                break
            pairs.append(a / b)
            s[f"service_{kind}{suffix}"]["ratio_to_vllm"] = a / b
        if pairs:
            out[f"service_{kind}_vs_vllm"] = statistics.median(pairs)
            out[f"service_{kind}_vs_vllm_each"] = pairs
    return out


def cross_dtype(runs: dict[str, Any]) -> dict[str, Any]:
    """bf16 (or any second dtype) against float32: throughput ratios per scenario and the accuracy difference."""
    if "float32" not in runs:
        return {}
    base = runs["float32"]
    out: dict[str, Any] = {}
    for dtype, run in runs.items():
        if dtype == "float32":
            continue
        entry: dict[str, Any] = {"throughput_ratio": {}}
        for name, scenario in run["scenarios"].items():
            ref = base["scenarios"].get(name)
            if ref and ref.get("texts_per_s") and scenario.get("texts_per_s"):
                entry["throughput_ratio"][name] = scenario["texts_per_s"] / ref["texts_per_s"]
        if "accuracy" in run and "accuracy" in base:
            a, b = run["accuracy"], base["accuracy"]
            entry["accuracy_points"] = 100 * (a["accuracy"] - b["accuracy"])
            flips = sum(
                (c1 > r1) != (c0 > r0)
                for c1, r1, c0, r0 in zip(
                    a["chosen_scores"], a["rejected_scores"], b["chosen_scores"], b["rejected_scores"], strict=True
                )
            )
            entry["preference_flips"] = flips
            entry["max_abs_score_diff"] = max(
                abs(x - y)
                for x, y in zip(
                    a["chosen_scores"] + a["rejected_scores"], b["chosen_scores"] + b["rejected_scores"], strict=True
                )
            )
        out[dtype] = entry
    return out


def targets(runs: dict[str, Any], cross: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dtype, run in runs.items():
        r = run["ratios"]
        for key in (
            "service_64x1_vs_ceiling",
            "service_4x64_vs_ceiling",
            "service_4x64_vs_naive",
            "service_64x1_vs_naive",
        ):
            if key in r:
                rows.append(
                    {
                        "dtype": dtype,
                        "target": key,
                        "want": f">= {TARGETS[key]}",
                        "got": round(r[key], 3),
                        "met": r[key] >= TARGETS[key],
                    }
                )
    for dtype, entry in cross.items():
        for name, ratio in entry["throughput_ratio"].items():
            rows.append(
                {
                    "dtype": dtype,
                    "target": f"{name}_vs_float32",
                    "want": f">= {TARGETS['bf16_vs_fp32']}",
                    "got": round(ratio, 3),
                    "met": ratio >= TARGETS["bf16_vs_fp32"],
                }
            )
        if "accuracy_points" in entry:
            pts = entry["accuracy_points"]
            rows.append(
                {
                    "dtype": dtype,
                    "target": "accuracy_points_vs_float32",
                    "want": f"within {TARGETS['bf16_accuracy_points']}",
                    "got": round(pts, 2),
                    "met": abs(pts) <= TARGETS["bf16_accuracy_points"],
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine = describe_machine()
    log(f"CPU: {cpu_line(machine)}")
    load_before = sample_machine(1.0)
    log(f"machine before the run: {load_before}")
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as scratch:
        checkpoint_dir = resolve_checkpoint(args, Path(scratch))
        pool = load_pool(args.texts, data=None if args.smoke and args.data == DEFAULT_DATA else args.data)
        log(f"checkpoint {checkpoint_dir}; {len(pool.items)} texts from {pool.source}")
        runs = {}
        for dtype in args.dtypes:
            runs[dtype] = run_dtype(args, checkpoint_dir, dtype, pool, args.output)
        cross = cross_dtype(runs)
        for run in runs.values():  # the raw scores served their purpose
            for key in ("chosen_scores", "rejected_scores"):
                run.get("accuracy", {}).pop(key, None)
        manifest_path = checkpoint_dir / "reward_manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        report = {
            "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "label": args.label,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "machine": machine,
            "load_before": load_before,
            "load_after": sample_machine(1.0),
            "checkpoint": {
                "path": str(checkpoint_dir),
                "name": manifest.get("name"),
                "base_model": manifest.get("base_model"),
                "max_length": manifest.get("formatting", {}).get("max_length"),
            },
            "texts": pool.describe(),
            "settings": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("dtype", "scenarios")
            },
            "runs": runs,
            "cross_dtype": cross,
            "targets": targets(runs, cross),
        }
    from bench.report import write_all

    paths = write_all(report, args.output)
    log(f"machine after the run: {report['load_after']} (CPU: {cpu_line(machine)})")
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0
