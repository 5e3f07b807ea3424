"""TRL's stock reward recipe, for ``python -m bench.quality --compare``: ``RewardTrainer`` with its own defaults.

    python -m bench.trl_stock --train train.jsonl --output DIR [--model PATH] [RewardConfig flags, e.g. --seed 1]

Everything is TRL 1.16's default (learning rate, epochs, batch size, scheduler, no length grouping, pairs longer
than ``max_length`` dropped, dropout disabled) except the least an encoder base model on a CPU needs:

- ``bf16`` off: ``RewardConfig`` turns it on when ``fp16`` is off, which fails without a bf16-capable accelerator;
- ``gradient_checkpointing`` off: TRL's default trades compute for memory; with dropout disabled it computes the
  same gradients, so turning it off changes the time, not the result;
- no ``eos_token`` appended as text: a BERT tokenizer has no ``eos_token`` (TRL's ``add_eos`` fails on ``None``),
  and naming ``[SEP]`` would give a doubled ``[SEP]``. The pairs are tokenized exactly as TRL's own tokenization
  step does it (``tokenizer(text=...)``, the tokenizer's own special tokens) and handed over pre-tokenized, so TRL
  still applies its ``max_length`` filter;
- ``max_length`` capped at the model's position limit (TRL's 1,024 > MiniLM's 512 would crash on pairs between).

The checkpoint gets a manifest whose formatting recipe reproduces that tokenization (encoder family, the
tokenizer's special tokens, no eos, ``max_length`` as trained), so ``reward-eval`` scores it with the token ids it
was trained on; held-out texts longer than that are cut on the left (the reply being judged is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# Prepended to the command line, so a flag given explicitly still wins.
CPU_FIXES = ["--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none"]


def tokenize_like_trl(tokenizer: Any, text: str) -> list[int]:
    """TRL's tokenization of a plain-text side (``trl.data_utils._tokenize``), without the ``eos`` text append."""
    return list(tokenizer(text=text)["input_ids"])


def pair_ids_like_trl(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """A plain-text preference row as TRL tokenizes it: an explicit ``prompt`` is prepended to each side."""
    prompt = row.get("prompt", "")
    sides = (row["chosen"], row["rejected"])
    if not all(isinstance(x, str) for x in (prompt, *sides)):
        raise ValueError("the stock recipe here takes plain-text pairs (conversational rows are not supported)")
    return tokenize_like_trl(tokenizer, prompt + sides[0]), tokenize_like_trl(tokenizer, prompt + sides[1])


def position_limit(model_path: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)


def parse(argv: list[str] | None):
    from transformers import HfArgumentParser
    from trl import RewardConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--train", type=Path, required=True, help="training pairs (.jsonl, chosen/rejected text)")
    parser.add_argument("--output", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--model", default=None, help="base model (default: the project's embedded MiniLM-L6)")
    known, rest = parser.parse_known_args(argv)
    (config,) = HfArgumentParser(RewardConfig).parse_args_into_dataclasses(
        [*CPU_FIXES, "--output_dir", str(known.output), *rest]
    )
    return known, config


def train_stock(train_path: Path, output: Path, model_path: str, config: Any) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardTrainer

    from training.checkpoint import write_manifest
    from training.data import load_preference_rows
    from training.formatting import recipe_for

    limit = position_limit(model_path)
    if config.max_length is not None and limit is not None and config.max_length > limit:
        config.max_length = limit
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = load_preference_rows(str(train_path))
    pairs = [pair_ids_like_trl(tokenizer, row) for row in rows]
    columns = {"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]}
    trainer = RewardTrainer(
        model=model_path, args=config, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer
    )
    kept = len(trainer.train_dataset)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trainer.model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    recipe = recipe_for(tokenizer, max_length=config.max_length or limit or 512, truncation_side="left")
    training = {
        "recipe": "trl-stock",
        "n_rows": len(rows),
        "n_train": kept,
        "dropped_long": len(rows) - kept,
        "train_seconds": round(train_seconds, 1),
        "max_length": config.max_length,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.num_train_epochs,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "seed": config.seed,
    }
    write_manifest(output, {"name": output.name, "formatting": recipe.to_dict(), "training": training})
    return training


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, config = parse(argv)
    if args.model is None:
        from training.train import default_base_model

        args.model = default_base_model()
    print(json.dumps(train_stock(args.train, args.output, args.model, config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
