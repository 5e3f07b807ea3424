"""The benchmarks' data: preference pairs named by ``--data``, and the text pool a throughput run sends.

``--data`` takes a hub data set id (loaded through ``datasets``; network needed the first time, cached after), a
local file (``.jsonl`` with ``chosen``/``rejected``, as :mod:`training.data` reads it), or ``demo`` (the project's
demo pairs, offline). The default is the public hh-rlhf harmless pairs (``Anthropic/hh-rlhf``, ``--data-dir
harmless-base``, ``--split test``): real human judgements, and for a throughput benchmark a realistic length
spread (median about 130 MiniLM tokens, a long tail past 512), where batching and padding behave very differently
from uniform short texts.

Every pooled text is one side of a preference pair, as an item the service accepts (``{"text"}`` for transcripts,
``{"prompt", "response"}`` for the demo pairs), chosen with a fixed seed so two runs score the same texts.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_DATA = "Anthropic/hh-rlhf"
HUB_DATA_DIR = "harmless-base"
HUB_SPLIT = "test"
DEMO = "demo"


def add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None = HUB_DATA) -> None:
    parser.add_argument(
        "--data",
        default=default,
        help=f"preference pairs: a hub data set id (through `datasets`, network needed), a local .jsonl file, or "
        f"`{DEMO}` (the project's demo pairs); default {default}",
    )
    parser.add_argument(
        "--data-dir", default=HUB_DATA_DIR, help=f"the hub data set's data_dir (default {HUB_DATA_DIR})"
    )
    parser.add_argument("--split", default=HUB_SPLIT, help=f"the hub data set's split (default {HUB_SPLIT})")


def load_rows(data: str | Path, *, data_dir: str | None = HUB_DATA_DIR, split: str = HUB_SPLIT) -> tuple[list, str]:
    """The preference rows ``--data`` names, and a line saying where they came from."""
    from training.data import load_preference_rows

    if str(data) == DEMO or Path(data).exists():
        return load_preference_rows(str(data)), "the project's demo pairs" if str(data) == DEMO else str(data)
    rows = load_preference_rows(str(data), split=split, data_dir=data_dir)
    return rows, f"{data} ({data_dir}, {split})"


@dataclass
class TextPool:
    """The items to send and, once tokenized with the checkpoint's formatter, their token counts."""

    items: list[dict[str, Any]]
    source: str
    lengths: list[int] | None = None  # tokens per item under the served formatting recipe
    truncated: int = 0
    max_length: int | None = None  # the recipe's truncation length (a peer server is asked to truncate there too)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "n": len(self.items)}
        if self.lengths:
            ordered = sorted(self.lengths)
            out.update(
                tokens_min=ordered[0],
                tokens_median=ordered[len(ordered) // 2],
                tokens_p90=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                tokens_max=ordered[-1],
                tokens_mean=round(sum(ordered) / len(ordered), 1),
                truncated=self.truncated,
            )
        return out


def _pair_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from training.formatting import pair_side

    items = []
    for row in rows:
        for side in ("chosen", "rejected"):
            try:
                items.append(pair_side(row, side))
            except Exception:  # a malformed row is skipped, not fatal, for a benchmark
                continue
    return items


def load_pool(n: int, rows: list[dict[str, Any]], source: str, *, seed: int = 0) -> TextPool:
    """``n`` items (fewer if the rows have fewer), both sides of every pair, shuffled with ``seed``."""
    items = _pair_items(rows)
    random.Random(seed).shuffle(items)
    return TextPool(items[: max(1, n)], source)


def held_out_pairs(n: int, data: str | Path, rows: list[dict[str, Any]], *, seed: int = 0) -> tuple[list, str]:
    """Preference rows for the dtype accuracy check: the same held-out split as ``bench.quality`` (seed 0), or the
    demo pairs' held-out topics."""
    if str(data) == DEMO:
        from training.demo_data import generate_split

        _, held_out = generate_split(600, seed=0)
        return held_out[:n], "demo held-out topics (training.demo_data.generate_split)"
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)  # bench.quality: the first eval_pairs rows are held out
    return shuffled[:n], f"first {n} of {data} shuffled with seed {seed} (bench.quality's held-out split)"
