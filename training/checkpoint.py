"""A reward checkpoint on disk: the Hugging Face folder plus ``reward_manifest.json``.

Loading lives here so that ``reward-eval`` and the service read a checkpoint the same way: safetensors only, never
remote code, the formatting recipe from the manifest (or the default one for a plain classifier folder).
Needs torch and transformers, not TRL.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.formatting import Formatter, FormattingRecipe, recipe_for

MANIFEST_NAME = "reward_manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: missing, no tokenizer, no safetensors weights."""


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable manifest ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict) or "formatting" not in data:
        raise CheckpointError(f"{file}: not a reward manifest (no 'formatting' section)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    return data


def share_checkpoint(path: str | Path) -> None:
    """Give the checkpoint's files the read permissions the umask allows (and its folders search permission).

    safetensors writes ``model.safetensors`` readable by its owner only, whatever the umask, so a checkpoint trained
    as one user could not be served as another (the serving image runs as uid 10001) though its other files could.
    """
    umask = os.umask(0)
    os.umask(umask)
    readable = 0o444 & ~umask
    for root, dirs, files in os.walk(path):
        for name in dirs:
            folder = Path(root, name)
            folder.chmod(folder.stat().st_mode | readable | (readable >> 2))
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                file.chmod(file.stat().st_mode | readable)
    top = Path(path)
    top.chmod(top.stat().st_mode | readable | (readable >> 2))


def check_readable(path: Path) -> None:
    """:class:`CheckpointError` naming the first file of the checkpoint this process may not read, and the fix."""
    fix = f"Make it readable (chmod -R a+rX {path}; reward-train does so for what it writes) or run as its owner"
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(
            f"{path}: permission denied: this process (uid {os.getuid()}) cannot list the folder. {fix}"
        )
    for file in sorted(path.iterdir()):
        if file.is_file() and not os.access(file, os.R_OK):
            raise CheckpointError(
                f"{file}: permission denied: this process (uid {os.getuid()}) cannot read it (mode "
                f"{stat.filemode(file.stat().st_mode)}, owner uid {file.stat().st_uid}). {fix}"
            )


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    file = Path(path) / MANIFEST_NAME
    file.write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2, sort_keys=False) + "\n")
    return file


# Any one of these marks a folder that really holds a tokenizer. Without them, transformers 5 still "loads" one for
# some architectures (BERT: a 5-token vocabulary of special tokens) and every word silently becomes [UNK].
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: no usable tokenizer in this folder ({exc.__class__.__name__})") from exc


@dataclass
class RewardCheckpoint:
    """What a scorer needs: the model, its formatter, and the manifest (if the folder has one)."""

    path: Path
    model: Any
    formatter: Formatter
    manifest: dict[str, Any] | None
    label_index: int = 0

    @property
    def pad_token_id(self) -> int:
        return int(self.formatter.tokenizer.pad_token_id)

    @property
    def normalization(self) -> dict[str, float] | None:
        return (self.manifest or {}).get("normalization")

    @property
    def name(self) -> str:
        return (self.manifest or {}).get("name") or self.path.name


def resolve_dtype(dtype: str | None):
    import torch

    if dtype in (None, "auto", "float32", "fp32"):
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CheckpointError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def label_index_for(config: Any, label: str | int | None) -> int:
    """Which logit is the reward: an index, or a label name from ``config.id2label`` (``"nothate"``)."""
    num_labels = int(getattr(config, "num_labels", 1))
    if label is None:
        if num_labels != 1:
            raise CheckpointError(
                f"the model has {num_labels} outputs; pick the reward with --reward-label NAME|INDEX "
                f"(labels: {dict(getattr(config, 'id2label', {}))})"
            )
        return 0
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        index = int(label)
        if not 0 <= index < num_labels:
            raise CheckpointError(f"reward label index {index} is out of range for {num_labels} outputs")
        return index
    for index, name in getattr(config, "id2label", {}).items():
        if str(name).lower() == str(label).lower():
            return int(index)
    raise CheckpointError(f"reward label {label!r} is not one of {dict(getattr(config, 'id2label', {}))}")


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = "cpu",
    reward_label: str | int | None = None,
    max_length: int | None = None,
    truncation_side: str | None = None,
) -> RewardCheckpoint:
    """Load a reward checkpoint for scoring. Overrides apply only to folders without a manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    check_readable(path)
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no .safetensors weights (only safetensors checkpoints are loaded)")
    manifest = read_manifest(path)
    tokenizer = load_tokenizer(path)
    if manifest is not None:
        recipe = FormattingRecipe.from_dict(manifest["formatting"])
        if tokenizer.pad_token_id is None and recipe.pad_token_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(recipe.pad_token_id)
    else:
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        recipe = recipe_for(
            tokenizer,
            max_length=max_length or _model_max_length(tokenizer),
            truncation_side=truncation_side or "left",  # type: ignore[arg-type]
        )
    tokenizer.padding_side = "right"
    model = load_model(path, dtype=resolve_dtype(dtype), use_safetensors=True)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(device)).eval()
    index = label_index_for(model.config, reward_label)
    return RewardCheckpoint(path, model, Formatter(tokenizer, recipe), manifest, index)


def load_model(path: str | Path, **kwargs: Any):
    """A sequence-classification model, never with remote code; load failures become :class:`CheckpointError`."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except Exception as exc:  # corrupt weights, missing config, unknown architecture: one clear line
        raise CheckpointError(f"{path}: cannot load the model ({exc.__class__.__name__}: {exc})") from exc


def _model_max_length(tokenizer: Any) -> int:
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit <= 1_000_000:
        return limit
    return 512


def pad_right(batch: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ``input_ids`` and ``attention_mask`` tensors: scores stay independent of batch neighbours."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def forward_scores(checkpoint: RewardCheckpoint, batch: Sequence[Sequence[int]]) -> list[float]:
    """One forward pass over a batch of token-id lists; the reward logit of each, as float32 Python floats."""
    import torch

    model = checkpoint.model
    input_ids, attention_mask = pad_right(batch, checkpoint.pad_token_id)
    device = model.device
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return logits[:, checkpoint.label_index].float().cpu().tolist()


def score_all(
    checkpoint: RewardCheckpoint, sequences: Sequence[Sequence[int]], *, max_batch_tokens: int = 2048, progress=None
) -> list[float]:
    """Score many sequences in length-sorted, token-budgeted batches; results in input order."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores: list[float] = [math.nan] * len(sequences)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(sequences[order[end]]) * (end - start + 1) <= max_batch_tokens:
            end += 1
        chunk = order[start:end]
        for i, s in zip(chunk, forward_scores(checkpoint, [sequences[i] for i in chunk]), strict=True):
            scores[i] = s
        if progress is not None:
            progress(len(chunk))
        start = end
    return scores


def normalize(score: float, normalization: dict[str, float] | None) -> float:
    if not normalization:
        raise CheckpointError("this checkpoint has no normalization statistics in its manifest")
    std = normalization.get("std") or 1.0
    return (score - normalization["mean"]) / std
