"""``python -m bench``: the throughput benchmark, every scenario in one run on one checkpoint, dtype and text pool.

    python -m bench [--checkpoint DIR] [--data Anthropic/hh-rlhf | FILE] [--dtype float32[,bfloat16]] [--texts 512]
                    [--duration-s 20] [--smoke]

The texts are both sides of the preference pairs ``--data`` names (:mod:`bench.texts`): the hh-rlhf harmless pairs
from the hub by default, a local .jsonl, or the demo pairs (``--smoke``'s default).

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
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare import cross_dtype, ratios, targets
from bench.procstat import describe_machine, sample_machine
from bench.report import cpu_line
from bench.scenarios import (
    CeilingClock,
    ServiceForwards,
    accuracy_check,
    check_peer_scores,
    log,
    measure_uncontended,
    run_ceiling,
    run_load,
    tokenize_pool,
)
from bench.servers import (
    PEERS_PYTHON,
    Server,
    naive_argv,
    service_argv,
    vllm_argv,
    vllm_env,
)
from bench.texts import DEMO, HUB_DATA, TextPool, add_data_arguments, held_out_pairs, load_pool, load_rows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "bench-minilm"
DEFAULT_OUTPUT = REPO / "bench" / "results"

SERVICE_SCENARIOS = ("service_64x1", "service_4x64", "service_open")
NAIVE_SCENARIOS = ("naive_64x1", "naive_4x64", "naive_open")
VLLM_SCENARIOS = ("vllm_64x1", "vllm_4x64", "vllm_open")
DEFAULT_SCENARIOS = ("ceiling",) + SERVICE_SCENARIOS + NAIVE_SCENARIOS
ALL_SCENARIOS = DEFAULT_SCENARIOS + VLLM_SCENARIOS


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
    add_data_arguments(p)
    p.set_defaults(data=None)  # Anthropic/hh-rlhf; --smoke: the demo pairs
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
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra reward-serve argument (repeatable; --server-arg=--max-batch-size --server-arg=16)",
    )
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
        # a few open-loop requests, not half the ceiling's rate: the naive server falls far behind that on long
        # texts, and draining its backlog would take minutes
        args.rate = args.rate or 8.0
    if args.data is None:
        args.data = DEMO if args.smoke else HUB_DATA
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
    data = ["--dataset_name", str(args.data)]
    if not (args.data == DEMO or Path(args.data).exists()):  # a hub id (in datasets' cache since load_rows)
        data += ["--dataset_data_dir", args.data_dir, "--dataset_train_split", args.split]
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        *data,
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
            if any(n in args.scenario_list for n in names):
                early[which] = Server(which, argv, logs / f"{which}-{dtype}.log").launch()
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
        held_out, source = args.held_out
        out["accuracy"] = {**accuracy_check(checkpoint, held_out), "source": source}
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
                if which in early:
                    up[which] = early[which].wait_ready()
                else:
                    up[which] = Server(which, argv, logs / f"{which}-{dtype}.log").start()
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
                        scenarios[key] = measure_uncontended(
                            args, lambda s=server, k=key: run_load(args, s, k, pool, rate), key
                        )
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine = describe_machine()
    log(f"CPU: {cpu_line(machine)}")
    load_before = sample_machine(1.0)
    log(f"machine before the run: {load_before}")
    rows, source = load_rows(args.data, data_dir=args.data_dir, split=args.split)  # before going offline
    pool = load_pool(args.texts, rows, source)
    if args.accuracy_pairs:
        args.held_out = held_out_pairs(args.accuracy_pairs, args.data, rows)
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as scratch:
        checkpoint_dir = resolve_checkpoint(args, Path(scratch))
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
