"""``reward-eval``: score a preference dataset or a benchmark with a reward checkpoint or a running service.

    reward-eval --checkpoint DIR --dataset FILE [--output report.json] [--plot rewards.png]
    reward-eval --checkpoint DIR --dataset allenai/reward-bench-2 --split test        # per subset, 95 % CIs
    reward-eval --url http://127.0.0.1:8000 [--checkpoint DIR] --dataset rm-bench.json  # through the service

Benchmark rows (RewardBench 2's best-of-N, RM-Bench's style matrix) are read and scored by
:mod:`training.benchmarks`; with both ``--url`` and ``--checkpoint`` the report gains a parity column, the largest
|service - in-process| over a group's items.

Every pair is encoded with the checkpoint's own :class:`~training.formatting.Formatter` (the recipe from its
manifest, so exactly what training and the service see) and scored with :func:`~training.checkpoint.score_all`.

Metrics:

- ``accuracy``: the fraction of pairs whose chosen reward is strictly higher than the rejected one, a tie counting
  as half a pair (an untrained model that scores everything the same gets 0.5, not 0 or 1);
- ``mean_margin``: the mean of ``chosen - rejected``;
- ``n``: the number of pairs; ``truncated``: pairs where either side was cut to ``max_length``.

:func:`evaluate_pairs` is the same computation as a function; ``reward-train`` uses it for the manifest's ``eval``
section and its ``normalization`` statistics. Needs torch and transformers (matplotlib for ``--plot``), not TRL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training import benchmarks
from training.checkpoint import CheckpointError, RewardCheckpoint, load_checkpoint, score_all
from training.data import DataError, load_preference_rows
from training.formatting import FormattingError

DEFAULT_MAX_BATCH_TOKENS = 2048


class EvaluationError(ValueError):
    """A dataset that cannot be evaluated: unreadable, empty, or of an unknown format."""


# -- metrics -----------------------------------------------------------------------------------------------------
def pair_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float | int]:
    """``n``, ``accuracy`` (strict ``>``, ties count 0.5) and ``mean_margin`` of paired scores."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen scores but {len(rejected)} rejected scores")
    n = len(chosen)
    if n == 0:
        raise EvaluationError("no pairs to evaluate")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return {
        "n": n,
        "accuracy": wins / n,
        "mean_margin": math.fsum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
    }


def normalization_stats(scores: Sequence[float]) -> dict[str, float]:
    """Mean and (population) standard deviation of raw rewards, for the manifest's ``normalization``."""
    if not scores:
        raise EvaluationError("no scores to compute normalization statistics from")
    mean = math.fsum(scores) / len(scores)
    var = math.fsum((s - mean) ** 2 for s in scores) / len(scores)
    return {"mean": mean, "std": math.sqrt(var)}


def evaluate_pairs(
    checkpoint: RewardCheckpoint,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    progress=None,
) -> dict[str, Any]:
    """Score preference rows (``chosen``/``rejected``, optional ``prompt``) with a loaded checkpoint.

    Returns ``n``, ``accuracy``, ``mean_margin``, ``truncated``, ``chosen_mean``, ``rejected_mean``,
    ``normalization`` (``mean``/``std`` over both sides) and the raw ``chosen_scores`` / ``rejected_scores`` in row
    order. A malformed row raises :class:`~training.formatting.FormattingError` naming its index.
    """
    if not rows:
        raise EvaluationError("the data set is empty")
    chosen_ids: list[list[int]] = []
    rejected_ids: list[list[int]] = []
    truncated = 0
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise FormattingError(
                f"row {index}: expected an object with 'chosen' and 'rejected', got {type(row).__name__}"
            )
        try:
            chosen, rejected = checkpoint.formatter.encode_pair(row)
        except FormattingError as exc:
            raise FormattingError(f"row {index}: {exc}") from exc
        chosen_ids.append(chosen.input_ids)
        rejected_ids.append(rejected.input_ids)
        truncated += int(chosen.truncated or rejected.truncated)
    scores = score_all(checkpoint, chosen_ids + rejected_ids, max_batch_tokens=max_batch_tokens, progress=progress)
    n = len(rows)
    chosen_scores, rejected_scores = scores[:n], scores[n:]
    return {
        **pair_metrics(chosen_scores, rejected_scores),
        "truncated": truncated,
        "chosen_mean": math.fsum(chosen_scores) / n,
        "rejected_mean": math.fsum(rejected_scores) / n,
        "normalization": normalization_stats(scores),
        "chosen_scores": chosen_scores,
        "rejected_scores": rejected_scores,
    }


# -- report ------------------------------------------------------------------------------------------------------
SUMMARY_KEYS = ("n", "accuracy", "mean_margin", "truncated", "chosen_mean", "rejected_mean")


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in SUMMARY_KEYS:
        value = result[key]
        lines.append(f"{key}: {value:.6f}" if isinstance(value, float) else f"{key}: {value}")
    return lines


def plot_rewards(chosen: Sequence[float], rejected: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """Overlaid histograms of chosen and rejected rewards, and a histogram of margins, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    bins = max(10, min(60, int(math.sqrt(len(chosen))) * 2))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        low, high = min(min(chosen), min(rejected)), max(max(chosen), max(rejected))
        edges = [low + (high - low) * i / bins for i in range(bins + 1)] if high > low else bins
        left.hist(
            chosen, bins=edges, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.3f})", color="tab:green"
        )
        left.hist(
            rejected,
            bins=edges,
            alpha=0.6,
            label=f"rejected (mean {sum(rejected) / len(rejected):.3f})",
            color="tab:red",
        )
        left.set_xlabel("reward")
        left.set_ylabel("pairs")
        left.set_title("reward distributions")
        left.legend()
        right.hist(margins, bins=bins, color="tab:blue", alpha=0.8)
        right.axvline(0.0, color="black", linestyle="--", linewidth=1)
        right.set_xlabel("chosen - rejected")
        right.set_title("margins")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


# -- CLI ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reward-eval",
        description="Score a preference dataset with a reward checkpoint: accuracy, mean margin, truncation.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="reward checkpoint folder (from reward-train, or any safetensors sequence-classification folder); "
        "with --url as well, scored both ways for the parity column",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="score through a running reward service (its POST /score) instead of, or besides, --checkpoint",
    )
    parser.add_argument("--api-key", default=None, help="the service's API key, for --url")
    parser.add_argument(
        "--dataset",
        required=True,
        help="a local .jsonl/.json/.csv/.parquet file or folder, or a hub data set id: preference pairs (chosen, "
        "rejected, optional prompt), RewardBench 2 rows or RM-Bench rows",
    )
    parser.add_argument("--split", default=None, help="dataset split, for sources that have several")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *benchmarks.FORMATS),
        help="row format; auto: rewardbench2 for list-valued chosen with a subset column, rm-bench with a domain "
        "column, else pairs",
    )
    parser.add_argument(
        "--as-messages",
        action="store_true",
        help="benchmark rows: score each answer as a user/assistant conversation through the model's chat "
        "template (default: prompt + answer concatenated, as training formats pairs)",
    )
    parser.add_argument("--output", default=None, help="write the JSON report (metrics and per-pair scores) here")
    parser.add_argument("--plot", default=None, help="write a PNG of the reward and margin distributions here")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"token budget per forward batch (default {DEFAULT_MAX_BATCH_TOKENS})",
    )
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--reward-label",
        default=None,
        help="which output is the reward, for multi-output classifiers: a label name or index",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max tokens per side, only for checkpoints without a manifest (default: the tokenizer's)",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_batch_tokens < 1:
        raise EvaluationError(f"--max-batch-tokens must be positive, got {args.max_batch_tokens}")
    if args.checkpoint is None and args.url is None:
        raise EvaluationError("give --checkpoint, --url, or both")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint folder")
    rows = load_preference_rows(args.dataset, **({"split": args.split} if args.split else {}))
    if not rows:
        raise EvaluationError(f"{args.dataset}: the data set is empty")
    fmt = benchmarks.detect_format(rows) if args.format == "auto" else args.format
    checkpoint = (
        load_checkpoint(
            args.checkpoint,
            dtype=args.dtype,
            device=args.device,
            reward_label=args.reward_label,
            max_length=args.max_length,
        )
        if args.checkpoint is not None
        else None
    )
    if fmt != benchmarks.PAIRS or args.url is not None:
        return run_benchmark(args, rows, fmt, checkpoint)
    result = evaluate_pairs(checkpoint, rows, max_batch_tokens=args.max_batch_tokens)
    report = {
        "checkpoint": str(args.checkpoint),
        "dataset": str(args.dataset),
        **{key: result[key] for key in SUMMARY_KEYS},
        "normalization": result["normalization"],
        "max_length": checkpoint.formatter.recipe.max_length,
        "ties": "strict comparison; a tie counts as half a correct pair",
        "scores": {"chosen": result["chosen_scores"], "rejected": result["rejected_scores"]},
    }
    publish(summary_lines(result), report, args.output)
    if args.plot:
        plot_rewards(result["chosen_scores"], result["rejected_scores"], args.plot, title=checkpoint.name)
        print(f"plot: {args.plot}")
    return report


def run_benchmark(args: argparse.Namespace, rows: list[dict[str, Any]], fmt: str, checkpoint: Any) -> dict[str, Any]:
    """Benchmark rows (or pairs through a service): per-group accuracy with 95 % intervals, and parity when scored
    both through ``--url`` and in-process."""
    cands = benchmarks.candidates(rows, fmt, as_messages=args.as_messages)
    local = (
        benchmarks.checkpoint_scorer(checkpoint, max_batch_tokens=args.max_batch_tokens)
        if checkpoint is not None
        else None
    )
    remote = benchmarks.service_scorer(args.url, api_key=args.api_key) if args.url is not None else None
    scores, truncated = (remote or local)(cands.items)  # type: ignore[misc]
    reference = local(cands.items)[0] if remote is not None and local is not None else None
    result = benchmarks.report(cands, fmt, scores, truncated=truncated, reference=reference)
    report = {
        "dataset": str(args.dataset),
        "checkpoint": str(args.checkpoint) if args.checkpoint is not None else None,
        "url": args.url,
        "scored_by": "service" if remote is not None else "checkpoint",
        "items": "messages" if args.as_messages else "prompt + response",
        "ties": "strict comparison; a tie counts as wrong (pairs: half)",
        **result,
    }
    publish(benchmarks.table(result), report, args.output)
    return report


def publish(lines: Sequence[str], report: Mapping[str, Any], output: str | None) -> None:
    """Print the summary lines; write the JSON report to ``output`` when given."""
    for line in lines:
        print(line)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    expected = (
        FormattingError,
        CheckpointError,
        EvaluationError,
        DataError,
        benchmarks.BenchmarkError,
        FileNotFoundError,
        OSError,
    )
    try:
        run(args)
    except expected as exc:
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        print(f"reward-eval: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
