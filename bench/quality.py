"""Quality benchmark: train on real hh-rlhf harmless pairs and measure held-out accuracy.

    python -m bench.quality [--data Anthropic/hh-rlhf | FILE] [--eval-pairs 300] [-- extra reward-train flags]
    python -m bench.quality --compare --output DIR [--folds 3] [--seeds 0,1] [--max-runs N]

``--data`` is a hub data set id (the hh-rlhf harmless pairs by default, through ``datasets``) or a local .jsonl file
(see :mod:`bench.texts`). The first form splits the pairs deterministically (seed 0) into training and held-out pairs
in a scratch folder (the data is never written into the project), runs ``reward-train`` with its defaults plus any
extra flags, then ``reward-eval`` on the held-out pairs, and prints the accuracy and the wall-clock training time.

``--compare`` puts two recipes side by side on the same k folds of the pairs (each pair held out exactly once):
``default`` (``reward-train`` with its defaults) and ``trl-stock`` (TRL's ``RewardTrainer`` with its own defaults,
see :mod:`bench.trl_stock`), every fold with every seed, interleaved (default, trl-stock, default, ...) so machine
drift hits both alike. Both checkpoints are scored by ``reward-eval`` on the fold's held-out pairs, each with the
formatting recipe in its manifest, i.e. the tokenization it was trained with. Every run is written to
``DIR/runs/`` as it finishes and skipped when there already, so a study can be resumed or grown (``--max-runs``)
run by run; the table over whatever runs exist is printed and written to ``DIR/compare.json`` and
``DIR/compare.md``. Several processes may share one ``--output`` (e.g. one per recipe, or more to use more
cores): each run is claimed by creating its folder under ``DIR/work/``, deleted when the run is done.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.texts import add_data_arguments, load_rows

RECIPES = ("default", "trl-stock")


def read_lines(data: Path) -> list[str]:
    return [line for line in data.read_text().splitlines() if line.strip()]


def data_lines(args: argparse.Namespace) -> list[str]:
    """The pairs ``--data`` names, one JSON object a line."""
    rows, _ = load_rows(args.data, data_dir=args.data_dir, split=args.split)
    return [json.dumps(row, ensure_ascii=False) for row in rows]


def split_lines(rows: list[str], eval_pairs: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    train, held_out = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("\n".join(rows[eval_pairs:]) + "\n")
    held_out.write_text("\n".join(rows[:eval_pairs]) + "\n")
    return train, held_out


def fold_split(rows: list[str], folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and held-out rows of one of ``folds`` folds: the rows shuffled with ``seed``, then cut into
    contiguous parts; part ``fold`` is held out, so every row is held out exactly once over the folds."""
    if not 0 <= fold < folds or folds < 2 or len(rows) < folds:
        raise ValueError(f"fold {fold} of {folds} over {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    start, stop = fold * len(rows) // folds, (fold + 1) * len(rows) // folds
    held = set(order[start:stop])
    return [rows[i] for i in order if i not in held], [rows[i] for i in order[start:stop]]


def evaluate(checkpoint: Path, held_out: Path, report: Path) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            str(held_out),
            "--output",
            str(report),
        ],
        check=True,
    )
    return json.loads(report.read_text())


def single(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="reward-quality-") as scratch:
        scratch = Path(scratch)
        train, held_out = split_lines(data_lines(args), args.eval_pairs, scratch)
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
        result = evaluate(output, held_out, scratch / "report.json")
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


# -- side by side ------------------------------------------------------------------------------------------------
def train_command(
    recipe: str, train: Path, held_out: Path, output: Path, seed: int, model: str | None, flags: list[str]
) -> list[str]:
    if recipe == "default":
        cmd = [sys.executable, "-m", "training.train", "--dataset_name", str(train)]
        cmd += ["--eval_dataset_name", str(held_out), "--output_dir", str(output), "--seed", str(seed)]
        cmd += ["--report_to", "none"] + (["--model_name_or_path", model] if model else [])
    elif recipe == "trl-stock":
        cmd = [sys.executable, "-m", "bench.trl_stock", "--train", str(train), "--output", str(output)]
        cmd += ["--seed", str(seed)] + (["--model", model] if model else [])
    else:
        raise ValueError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
    return cmd + flags


def kept_by_trl(checkpoint: Path, held_out: Path, max_length: int) -> list[bool]:
    """Which held-out pairs TRL's stock recipe would keep: both sides, tokenized TRL's way, within ``max_length``."""
    from transformers import AutoTokenizer

    from bench.trl_stock import pair_ids_like_trl

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    pairs = [pair_ids_like_trl(tokenizer, json.loads(line)) for line in read_lines(held_out)]
    return [max(len(chosen), len(rejected)) <= max_length for chosen, rejected in pairs]


def subset_accuracy(report: dict[str, Any], keep: list[bool]) -> float | None:
    from training.evaluate import pair_metrics

    chosen = [c for c, k in zip(report["scores"]["chosen"], keep, strict=True) if k]
    rejected = [r for r, k in zip(report["scores"]["rejected"], keep, strict=True) if k]
    return pair_metrics(chosen, rejected)["accuracy"] if chosen else None


def position_limit(checkpoint: str) -> int | None:
    from bench.trl_stock import position_limit as limit

    return limit(checkpoint)


def run_one(
    recipe: str, fold: int, seed: int, *, rows: list[str], folds: int, work: Path, model: str | None, flags: list[str]
) -> dict[str, Any]:
    train_rows, held_rows = fold_split(rows, folds, fold)
    train, held_out, checkpoint = work / "train.jsonl", work / "heldout.jsonl", work / "checkpoint"
    train.write_text("\n".join(train_rows) + "\n")
    held_out.write_text("\n".join(held_rows) + "\n")
    cmd = train_command(recipe, train, held_out, checkpoint, seed, model, flags)
    print("$", shlex.join(cmd), flush=True)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    report = evaluate(checkpoint, held_out, work / "report.json")
    manifest = json.loads((checkpoint / "reward_manifest.json").read_text())
    training = manifest["training"]
    limit = position_limit(str(checkpoint)) or 512  # the longest pair TRL's stock recipe can keep
    keep = kept_by_trl(checkpoint, held_out, limit)
    result = {
        "recipe": recipe,
        "fold": fold,
        "folds": folds,
        "seed": seed,
        "command": shlex.join(cmd),
        "held_out_pairs": report["n"],
        "held_out_accuracy": report["accuracy"],
        "held_out_mean_margin": report["mean_margin"],
        "held_out_truncated": report["truncated"],
        "scored_max_length": report["max_length"],
        "short_pairs": sum(keep),
        "short_max_length": limit,
        "short_accuracy": subset_accuracy(report, keep),
        "train_pairs": training["n_train"],
        "train_rows": len(train_rows),
        "trainer_seconds": training["train_seconds"],
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
    }
    shutil.rmtree(work)
    return result


def plan(folds: int, seeds: list[int], recipes: tuple[str, ...] = RECIPES) -> list[tuple[str, int, int]]:
    """Seed-major, then fold, then recipe: every fold with the first seed (both recipes) comes first."""
    return [(recipe, fold, seed) for seed in seeds for fold in range(folds) for recipe in recipes]


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    per_recipe = {}
    for recipe in RECIPES:
        runs = [r for r in results if r["recipe"] == recipe]
        per_recipe[recipe] = {"runs": len(runs)}
        for key in ("held_out_accuracy", "short_accuracy", "trainer_seconds", "wall_seconds", "cpu_seconds"):
            mean, sd = mean_sd([r[key] for r in runs if r.get(key) is not None])
            per_recipe[recipe][key] = {"mean": mean, "sd": sd}
    by_cell = {(r["recipe"], r["fold"], r["seed"]): r for r in results}
    paired = [
        by_cell[("trl-stock", fold, seed)]["held_out_accuracy"] - r["held_out_accuracy"]
        for (recipe, fold, seed), r in by_cell.items()
        if recipe == "default" and ("trl-stock", fold, seed) in by_cell
    ]
    mean, sd = mean_sd(paired)
    return {"recipes": per_recipe, "paired_difference": {"pairs": len(paired), "mean": mean, "sd": sd}}


def _fmt(stat: dict[str, float | None], scale: float = 1.0, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    sd = "" if stat["sd"] is None else f" ± {stat['sd'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}{sd}"


def markdown(summary: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | runs | held-out accuracy | accuracy, pairs ≤ 512 tokens | trainer s | wall s | cpu s |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, s in summary["recipes"].items():
        lines.append(
            f"| {recipe} | {s['runs']} | {_fmt(s['held_out_accuracy'])} | {_fmt(s['short_accuracy'])} "
            f"| {_fmt(s['trainer_seconds'], digits=0)} | {_fmt(s['wall_seconds'], digits=0)} "
            f"| {_fmt(s['cpu_seconds'], digits=0)} |"
        )
    paired = summary["paired_difference"]
    if paired["pairs"]:
        lines.append(f"\ntrl-stock minus default, paired by fold and seed ({paired['pairs']}): {_fmt(paired)}")
    lines += [
        "",
        "| recipe | fold | seed | held-out | accuracy ≤ 512 | pairs ≤ 512 | train pairs | trainer s | wall s | cpu s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["seed"], r["fold"], RECIPES.index(r["recipe"]))):
        short = "-" if r["short_accuracy"] is None else f"{r['short_accuracy']:.4f}"
        lines.append(
            f"| {r['recipe']} | {r['fold']} | {r['seed']} | {r['held_out_accuracy']:.4f} | {short} "
            f"| {r['short_pairs']}/{r['held_out_pairs']} | {r['train_pairs']}/{r['train_rows']} "
            f"| {r['trainer_seconds']:.0f} | {r['wall_seconds']:.0f} | {r.get('cpu_seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def compare(args: argparse.Namespace) -> int:
    if args.output is None:
        raise SystemExit("--compare needs --output DIR (runs are kept there, so a study can be resumed)")
    rows = data_lines(args)
    runs_dir = args.output / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    flags = {"default": shlex.split(args.default_flags), "trl-stock": shlex.split(args.trl_flags)}
    new = 0
    for recipe, fold, seed in plan(args.folds, args.seeds, args.recipes):
        path = runs_dir / f"{recipe}-fold{fold}-seed{seed}.json"
        if path.exists():
            continue
        if args.max_runs is not None and new >= args.max_runs:
            break
        work = args.output / "work" / path.stem
        try:
            work.mkdir(parents=True)  # the claim: a second process on the same --output takes the next run
        except FileExistsError:
            print(f"{path.stem}: skipped, running elsewhere (or left by a stopped run: delete {work} to rerun it)")
            continue
        result = run_one(
            recipe, fold, seed, rows=rows, folds=args.folds, work=work, model=args.model, flags=flags[recipe]
        )
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result), flush=True)
        new += 1
    results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    results = [r for r in results if r["folds"] == args.folds]
    summary = summarize(results)
    table = markdown(summary, results)
    (args.output / "compare.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    (args.output / "compare.md").write_text(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--eval-pairs", type=int, default=300)
    parser.add_argument(
        "--output", type=Path, default=None, help="checkpoint folder (--compare: the study's results folder)"
    )
    parser.add_argument("--compare", action="store_true", help="the default and TRL's stock recipe side by side")
    parser.add_argument("--folds", type=int, default=3, help="--compare: k folds of the pairs")
    parser.add_argument(
        "--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1], help="--compare: e.g. 0,1"
    )
    parser.add_argument(
        "--recipes",
        type=lambda s: tuple(s.split(",")),
        default=RECIPES,
        help="--compare: which recipes to run (default both); two processes can share one --output",
    )
    parser.add_argument("--max-runs", type=int, default=None, help="--compare: stop after this many new runs")
    parser.add_argument("--model", default=None, help="--compare: base model (default: the embedded MiniLM-L6)")
    parser.add_argument("--default-flags", default="", help="--compare: extra reward-train flags (one string)")
    parser.add_argument("--trl-flags", default="", help="--compare: extra RewardConfig flags for trl-stock")
    parser.add_argument("train_flags", nargs="*", help="extra reward-train flags, after --")
    args = parser.parse_args(argv)
    return compare(args) if args.compare else single(args)


if __name__ == "__main__":
    sys.exit(main())
