"""The measurements of one benchmark run: the in-process ceiling (the service's own forward on sorted batches),
timed again around every load scenario, the held-out accuracy of a dtype, one load scenario against a running
server, and the check that a peer server scores what the checkpoint scores."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load as loadgen
from bench.procstat import CpuProbe, wait_quiet
from bench.report import CONTAMINATED_CORES
from bench.servers import Server, batch_stats, parse_metrics
from bench.texts import TextPool


def log(message: str) -> None:
    print(message, flush=True)


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


def measure_uncontended(args: argparse.Namespace, measure, name: str) -> dict[str, Any]:
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


def quiet(args: argparse.Namespace, own_pids: Sequence[int] = ()) -> None:
    if args.wait_quiet_s > 0:
        wait_quiet(args.wait_quiet_s, own_pids=own_pids, log=log)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


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
