"""Tiny random reward models with tokenizers built in-process (no network, no downloads).

- :func:`make_tiny_bert`: a BERT-like encoder with a WordPiece tokenizer whose vocabulary is the words of the demo
  data and of the tests, plus single characters and ``##`` continuations so any word still tokenizes;
- :func:`make_tiny_llama`: a Llama-like decoder with a byte-level BPE tokenizer trained on the same texts,
  ``<s>`` (bos) prepended to every text as Llama's tokenizers do, no pad token (so the eos fallback is exercised)
  and a small chat template.

Both save ``model.safetensors`` plus the tokenizer files to a folder usable as ``--model_name_or_path`` or as a
plain checkpoint for :func:`training.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from training import demo_data

# Words the tests use beyond the demo data's own vocabulary.
EXTRA_TEXTS = [
    "hello world the quick brown fox jumps over the lazy dog",
    "a good answer is helpful polite and on topic",
    "a bad answer is rude wrong vague or off topic",
    "system user assistant prompt response reply text messages chosen rejected",
    "one two three four five six seven eight nine ten",
    "red green blue yellow black white cat dog bird fish tree river mountain city",
    "please thank you sorry yes no maybe",
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
    return demo_data.all_texts() + EXTRA_TEXTS


def word_list() -> list[str]:
    """Lower-cased words and punctuation marks of the corpus, in first-seen order (deterministic)."""
    seen: dict[str, None] = {}
    for text in corpus():
        for token in re.findall(r"\w+|[^\w\s]", text.lower()):
            seen.setdefault(token, None)
    return list(seen)


def bert_vocab() -> dict[str, int]:
    tokens = list(BERT_SPECIALS)
    chars = list(string.ascii_lowercase + string.digits)
    tokens += [t for t in word_list() if t not in tokens]
    tokens += [c for c in chars + list(string.punctuation) if c not in tokens]
    tokens += ["##" + c for c in chars]
    seen: dict[str, int] = {}
    for token in tokens:
        seen.setdefault(token, len(seen))
    return seen


def make_bert_tokenizer():
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=bert_vocab(), do_lower_case=True)
    tokenizer.model_max_length = 512
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


def make_tiny_bert(directory: str | Path, *, seed: int = 0) -> Path:
    """A random 2-layer BERT sequence classifier (one output) and its tokenizer, saved to ``directory``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    directory = Path(directory)
    tokenizer = make_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
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
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
