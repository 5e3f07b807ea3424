"""Quality benchmark: train the default recipe on real hh-rlhf harmless pairs and measure held-out accuracy.

    python -m bench.quality [--data ../shared/data/hh-rlhf-harmless/dev.jsonl] [--eval-pairs 300] [-- extra reward-train flags]

Splits the file deterministically (seed 0) into training and held-out pairs in a scratch folder (the data is never
written into the project), runs ``reward-train`` with its defaults plus any extra flags, then ``reward-eval`` on the
held-out pairs, and prints the accuracy and the wall-clock training time. Skips cleanly when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


def split_file(data: Path, eval_pairs: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    rows = [line for line in data.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    train, held_out = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("\n".join(rows[eval_pairs:]) + "\n")
    held_out.write_text("\n".join(rows[:eval_pairs]) + "\n")
    return train, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--eval-pairs", type=int, default=300)
    parser.add_argument("--output", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("train_flags", nargs="*", help="extra reward-train flags, after --")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (the hh-rlhf pairs live in ../shared/data)")
        return 0
    with tempfile.TemporaryDirectory(prefix="reward-quality-") as scratch:
        scratch = Path(scratch)
        train, held_out = split_file(args.data, args.eval_pairs, scratch)
        output = args.output or scratch / "checkpoint"
        cmd = [
            sys.executable,
            "-m",
            "training.train",
            "--dataset_name",
            str(train),
            "--eval_dataset_name",
            str(held_out),
            "--output_dir",
            str(output),
            *args.train_flags,
        ]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - started
        report = scratch / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "training.evaluate",
                "--checkpoint",
                str(output),
                "--dataset",
                str(held_out),
                "--output",
                str(report),
            ],
            check=True,
        )
        result = json.loads(report.read_text())
        manifest = json.loads((output / "reward_manifest.json").read_text())
        summary = {
            "held_out_accuracy": result["accuracy"],
            "held_out_mean_margin": result["mean_margin"],
            "held_out_pairs": result["n"],
            "train_pairs": manifest["training"]["n_train"],
            "train_truncated": manifest["training"]["train_truncated"],
            "trainer_seconds": manifest["training"]["train_seconds"],
            "reward_train_wall_seconds": round(wall, 1),
            "flags": args.train_flags,
        }
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
