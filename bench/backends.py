"""``python -m bench.backends``: the service's forward backends timed against each other in-process, interleaved.

    python -m bench.backends --checkpoint DIR [--backends torch,onnx] [--repeats 3] [--workers 1,2]

Each repeat times every backend in turn (A B A B ...) on the same length-sorted batches of the text pool, with the
service's thread layouts (``--workers``: 1 worker with all torch threads, or 2 workers with half each), so that the
machine's drift and other processes' load fall on all backends alike; the ratio to the first backend is printed for
every repeat. Before timing, every backend scores the whole pool and its largest difference from torch's scores
is printed (the service's tolerance for scores of the same text is 1e-5).

Backends: ``torch`` (transformers in eager mode, ``--backend torch``), ``onnx`` (ONNX Runtime on the exported
graph, each text computed alone, unpadded, ``--backend onnx``), ``onnx-padded`` (the same graph on padded batches),
``onnx-full`` (the model's own forward exported whole, one text at a time: what ``onnx`` serves for models other
than BERT classifiers), ``compile`` (``torch.compile`` of the same model with dynamic shapes; measured here
only, not a service backend).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.ceiling import _batches_sorted, remeasure, torch_forward
from bench.texts import add_data_arguments, load_pool, load_rows

Forward = Callable[[list[list[int]]], list[float]]


def make_forwards(checkpoint: Any, names: Sequence[str], threads: int) -> dict[str, Forward]:
    """Each named backend's forward over ``checkpoint``, for workers with ``threads`` threads each."""
    from service import onnx_session
    from service.backend import model_version

    out: dict[str, Forward] = {}
    for name in names:
        if name == "torch":
            out[name] = torch_forward(checkpoint)
        elif name in ("onnx", "onnx-padded"):
            version = model_version(Path(checkpoint.path), checkpoint.manifest)
            out[name] = onnx_session.load(checkpoint, version, threads, padded=name == "onnx-padded")
        elif name == "onnx-full":
            version = model_version(Path(checkpoint.path), checkpoint.manifest)
            out[name] = onnx_session.load_graph(checkpoint, version, threads, "full")
        elif name == "compile":
            out[name] = _compiled_forward(checkpoint)
        else:
            raise SystemExit(f"bench.backends: unknown backend {name!r} (torch, onnx, onnx-padded, onnx-full, compile)")
    return out


def _compiled_forward(checkpoint: Any) -> Forward:
    import torch

    from training.checkpoint import pad_right

    compiled = torch.compile(checkpoint.model, dynamic=True)

    def forward(batch: list[list[int]]) -> list[float]:
        input_ids, attention_mask = pad_right(batch, checkpoint.pad_token_id)
        with torch.inference_mode():
            logits = compiled(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, checkpoint.label_index].float().tolist()

    return forward


def max_diff(forward: Forward, reference: list[float], sequences: list[list[int]], batch_size: int) -> float:
    """Largest |score - reference| over the pool, scored in the timed batches."""
    worst = 0.0
    for batch in _batches_sorted([len(s) for s in sequences], batch_size):
        scores = forward([sequences[i] for i in batch])
        worst = max(worst, *(abs(s - reference[i]) for s, i in zip(scores, batch, strict=True)))
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--backends", default="torch,onnx", help="comma-separated; the first is the reference")
    p.add_argument("--texts", type=int, default=512)
    add_data_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="length-sorted batch size (the service's default ~8)")
    p.add_argument("--workers", default="2,1", help="thread layouts to time: 2 (two workers, half the threads) and 1")
    p.add_argument("--max-length", type=int, default=None, help="truncation, for a checkpoint without a manifest")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-s", type=float, default=5.0, help="seconds each timing lasts at least")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from service.backend import plan_threads
    from training.checkpoint import load_checkpoint

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    checkpoint = load_checkpoint(args.checkpoint, dtype="float32", device="cpu", max_length=args.max_length)
    pool = load_pool(args.texts, *load_rows(args.data, data_dir=args.data_dir, split=args.split))
    sequences = [checkpoint.formatter.encode(item).input_ids for item in pool.items]
    print(
        f"{len(sequences)} texts from {pool.source}, mean {statistics.mean(map(len, sequences)):.0f} tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results: dict[str, Any] = {"backends": names, "layouts": {}}
    for workers in (int(w) for w in args.workers.split(",") if w.strip()):
        plan = plan_threads("cpu", workers=workers)
        plan.apply()  # this thread (loading, the score check) runs as a worker would
        forwards = make_forwards(checkpoint, names, plan.threads_per_worker or 1)
        order = _batches_sorted([len(s) for s in sequences], args.batch_size)
        reference = [0.0] * len(sequences)
        for batch in order:
            for i, s in zip(batch, forwards[names[0]]([sequences[i] for i in batch]), strict=True):
                reference[i] = s
        diffs = {n: max_diff(f, reference, sequences, args.batch_size) for n, f in forwards.items()}
        print(
            f"{workers} worker(s) x {plan.threads_per_worker} thread(s): largest score difference from "
            f"{names[0]}: " + ", ".join(f"{n} {d:.2g}" for n, d in diffs.items()),
            flush=True,
        )
        rows = []
        for repeat in range(args.repeats):
            row = {}
            for name in names:
                result = remeasure(
                    checkpoint,
                    sequences,
                    args.batch_size,
                    min_seconds=args.min_s,
                    workers=workers,
                    forward=forwards[name],
                )
                row[name] = {"texts_per_s": result["texts_per_s"], "others_cores": result["cpu"].get("others_cores")}
            base = row[names[0]]["texts_per_s"]
            print(
                f"  repeat {repeat + 1}: "
                + "  ".join(
                    f"{n} {r['texts_per_s']:6.1f} texts/s (x{r['texts_per_s'] / base:.2f}, others "
                    f"{r['others_cores'] if r['others_cores'] is None else round(r['others_cores'], 2)} cores)"
                    for n, r in row.items()
                ),
                flush=True,
            )
            rows.append(row)
        ratios = {n: [r[n]["texts_per_s"] / r[names[0]]["texts_per_s"] for r in rows] for n in names[1:]}
        for n, rs in ratios.items():
            print(
                f"  {n} / {names[0]}, {workers} worker(s): median x{statistics.median(rs):.2f} "
                f"(each repeat: {', '.join(f'{r:.2f}' for r in rs)})",
                flush=True,
            )
        results["layouts"][str(workers)] = {"max_score_diff": diffs, "repeats": rows, "ratios": ratios}
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
