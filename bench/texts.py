"""The benchmark's texts: real hh-rlhf transcripts when ``../shared`` has them, else the project's demo pairs.

The hh-rlhf harmless pairs matter for a throughput benchmark because of their length spread (median about 130
MiniLM tokens, a long tail past 512): batching and padding behave very differently on uniform short texts.
Every text is one side of a preference pair, as an item the service accepts (``{"text"}`` for transcripts,
``{"prompt", "response"}`` for the demo pairs), chosen with a fixed seed so two runs score the same texts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"


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


def load_pool(n: int, *, data: Path | None = DEFAULT_DATA, seed: int = 0) -> TextPool:
    """``n`` items (fewer if the data has fewer), shuffled with ``seed``."""
    if data is not None and Path(data).is_file():
        rows = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
        items = _pair_items(rows)
        source = f"hh-rlhf harmless transcripts ({data})"
    else:
        from training.demo_data import generate_pairs

        items = _pair_items(generate_pairs(600, seed=0))
        source = "demo pairs (training.demo_data; ../shared/data/hh-rlhf-harmless is absent)"
    random.Random(seed).shuffle(items)
    return TextPool(items[: max(1, n)], source)


def held_out_pairs(n: int, *, data: Path | None = DEFAULT_DATA, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Preference rows for the dtype accuracy check: the same held-out split as ``bench.quality`` (seed 0)."""
    if data is not None and Path(data).is_file():
        rows = [line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
        random.Random(seed).shuffle(rows)  # bench.quality.split_file: the first eval_pairs rows are held out
        return [
            json.loads(r) for r in rows[:n]
        ], f"first {n} of {data} shuffled with seed {seed} (bench.quality's held-out split)"
    from training.demo_data import generate_split

    _, held_out = generate_split(600, seed=0)
    return held_out[:n], "demo held-out topics (training.demo_data.generate_split)"
