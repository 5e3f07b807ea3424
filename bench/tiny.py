"""Tiny random reward models with tokenizers built in-process (no network, no downloads), for the tests and for
``python -m bench --smoke``.

- :func:`make_tiny_bert`: a BERT-like encoder with a WordPiece tokenizer whose vocabulary is the words of the demo
  data and of the tests, plus single characters and ``##`` continuations so any word still tokenizes;
- :func:`make_tiny_llama`: a Llama-like decoder with a byte-level BPE tokenizer trained on the same texts,
  ``<s>`` (bos) prepended to every text as Llama's tokenizers do, no pad token (so the eos fallback is exercised)
  and a small chat template;
- :func:`make_tiny_checkpoint`: the BERT one with a reward manifest, as the benchmark's smoke run serves it.

Each saves ``model.safetensors`` plus the tokenizer files to a folder usable as ``--model_name_or_path``, as a plain
checkpoint for :func:`training.checkpoint.load_checkpoint`, or (with a manifest) as a served reward model. Their
scores mean nothing and their speed says nothing about a real model's.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Words the tests use beyond the demo data's own vocabulary.
EXTRA_TEXTS = [
    "hello world the quick brown fox jumps over the lazy dog",
    "a good answer is helpful polite and on topic",
    "a bad answer is rude wrong vague or off topic",
    "a great or terrible reply is harmful or not",
    "system user assistant human prompt response reply text messages chosen rejected",
    "one two three four five six seven eight nine ten plus equals math",
    "red green blue yellow black white cat dog bird fish tree river mountain city sky",
    "please thank thanks you sorry sure yes no maybe here there what why how short long",
    "an are was were be to of in on at for with this that it i we they he she",
]

# A minimal chat template: bos, then "role: content" closed by eos for every message.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Larger than the usual 0.02 so that a random tiny model gives clearly different scores to different texts.
INIT_RANGE = 0.2

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus() -> list[str]:
    from training import demo_data

    return demo_data.all_texts() + EXTRA_TEXTS


def word_list() -> list[str]:
    """Lower-cased words and punctuation marks of the corpus, in first-seen order (deterministic)."""
    seen: dict[str, None] = {}
    for text in corpus():
        for token in re.findall(r"\w+|[^\w\s]", text.lower()):
            seen.setdefault(token, None)
    return list(seen)


def bert_vocab() -> dict[str, int]:
    chars = list(string.ascii_lowercase + string.digits)
    tokens = BERT_SPECIALS + word_list() + chars + list(string.punctuation) + ["##" + c for c in chars]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def make_bert_tokenizer(*, chat_template: str | None = None):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=bert_vocab(), do_lower_case=True)
    tokenizer.model_max_length = 512
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_llama_tokenizer(*, chat_template: str | None = LLAMA_CHAT_TEMPLATE, add_eos: bool = False):
    """The tiny Llama tokenizer; ``add_eos`` makes it close every text with ``</s>`` too (as some tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    end = " </s>" if add_eos else ""
    backend.post_processor = processors.TemplateProcessing(
        single=f"<s> $A{end}", pair=f"<s> $A{end} <s> $B{end}", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_bert(
    directory: str | Path,
    *,
    seed: int = 0,
    num_labels: int = 1,
    hidden_size: int = 32,
    layers: int = 2,
    init_range: float = INIT_RANGE,
    chat_template: str | None = None,
    manifest: Mapping[str, Any] | None = None,
    max_length: int = 64,
) -> Path:
    """A random BERT sequence classifier and its tokenizer, saved to ``directory``.

    With ``manifest`` (its ``name``, ``normalization``, ... fields) a ``reward_manifest.json`` is written too, with
    the formatting recipe detected from the tokenizer (``max_length``, left truncation); without, the folder is a
    plain classifier. Three labels are named hate / nothate / neutral.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_bert_tokenizer(chat_template=chat_template)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_range,
    )
    if num_labels == 3:
        config.id2label = {0: "hate", 1: "nothate", 2: "neutral"}
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if manifest is not None:
        from training.checkpoint import write_manifest
        from training.formatting import recipe_for

        recipe = recipe_for(tokenizer, max_length=max_length, truncation_side="left")
        write_manifest(
            directory,
            {
                "name": "tiny-random-bert-reward",
                "base_model": "tiny random BERT (bench.tiny)",
                "formatting": recipe.to_dict(),
                "normalization": {"mean": 0.0, "std": 1.0},
                "eval": {},
                "training": {"data_fingerprint": f"none: random weights, seed {seed}"},
                **manifest,
            },
        )
    return directory


def make_tiny_llama(directory: str | Path, *, seed: int = 0, chat_template: str | None = LLAMA_CHAT_TEMPLATE) -> Path:
    """A random 2-layer Llama sequence classifier (one output) with a pad-less tokenizer, saved to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    directory = Path(directory)
    tokenizer = make_llama_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_checkpoint(directory: str | Path, *, max_length: int = 128, seed: int = 0) -> Path:
    """The smoke run's reward checkpoint: :func:`make_tiny_bert` with a manifest (normalization 0/1)."""
    return make_tiny_bert(directory, seed=seed, max_length=max_length, manifest={"name": "bench-tiny-random-bert"})


def make_tiny_decoder(
    directory: str | Path,
    *,
    architecture: str = "llama",
    seed: int = 0,
    layers: int = 2,
    chat_template: str | None = LLAMA_CHAT_TEMPLATE,
) -> Path:
    """A random 2-layer Llama or Qwen3 sequence classifier with biases on its projections and every norm's weights
    (Qwen3's query/key norms too) drawn at random rather than left at one, so that a path that drops a bias or a norm
    gives different scores; the tokenizer is :func:`make_llama_tokenizer`'s (pad-less: eos pads)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification

    directory = Path(directory)
    tokenizer = make_llama_tokenizer(chat_template=chat_template)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "num_labels": 1,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "initializer_range": INIT_RANGE,
        "attention_bias": True,
    }
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**common, mlp_bias=True))
    elif architecture == "qwen3":
        model = Qwen3ForSequenceClassification(Qwen3Config(**common, head_dim=8))
    else:
        raise ValueError(f"architecture must be llama or qwen3, not {architecture!r}")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, INIT_RANGE)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
