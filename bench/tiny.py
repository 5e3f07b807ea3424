"""A tiny random BERT reward checkpoint for ``python -m bench --smoke``: built in-process in a second, no network.

It only has to exercise every code path of the harness (tokenizing, batching, both servers, the report); its
scores mean nothing and its speed says nothing about the real model's.
"""

from __future__ import annotations

import re
import string
from pathlib import Path


def _vocab() -> dict[str, int]:
    from training import demo_data

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words: dict[str, None] = {}
    for text in demo_data.all_texts() + ["human assistant"]:
        for token in re.findall(r"\w+|[^\w\s]", text.lower()):
            words.setdefault(token, None)
    chars = list(string.ascii_lowercase + string.digits)
    tokens += list(words) + chars + list(string.punctuation) + ["##" + c for c in chars]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def make_tiny_checkpoint(directory: str | Path, *, max_length: int = 128, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with one output, its tokenizer and a reward manifest."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from training.checkpoint import write_manifest
    from training.formatting import recipe_for

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=_vocab(), do_lower_case=True)
    tokenizer.model_max_length = 512
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    recipe = recipe_for(tokenizer, max_length=max_length, truncation_side="left")
    write_manifest(
        directory,
        {
            "name": "bench-tiny-random-bert",
            "base_model": "tiny random BERT (bench.tiny)",
            "formatting": recipe.to_dict(),
            "normalization": {"mean": 0.0, "std": 1.0},
            "eval": {},
            "training": {"data_fingerprint": "none: random weights"},
        },
    )
    return directory
