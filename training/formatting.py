"""The formatting contract: how an item becomes the token ids a reward model scores.

Training pre-tokenizes every preference pair with this module and the service tokenizes every request with it,
so a served score means exactly what the trained model meant. It needs a tokenizer and nothing else (no TRL, no
datasets, no torch).

Items come in three shapes, as in TRL:

- ``{"text": str}``: the whole text;
- ``{"prompt": str, "response": str}``: TRL's explicit-prompt semantics, the two are concatenated;
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered by the tokenizer's chat template.

The recipe (:class:`FormattingRecipe`) fixes everything else: the architecture family (encoders get their own
special tokens and nothing more, decoders get ``eos`` appended once), ``max_length`` and the truncation side. It is
written to the checkpoint's manifest and read back by the service.

No doubled special tokens: a text that already starts with the ``bos`` token the tokenizer adds (OpenRLHF sends the
policy's prompt + response decoded with its special tokens; any pre-templated text does the same) is not given a
second one, and a text that already ends with the ``eos`` token is not given a second one either, so ``"<bos>Hi"``
and ``"Hi"`` become the same ids. Recipes written before this rule (no ``skip_duplicate_specials`` in the manifest)
keep their old behaviour: such a checkpoint was trained without the rule, and is served as it was trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Architecture = Literal["encoder", "decoder"]
TruncationSide = Literal["left", "right"]

DEFAULT_MAX_LENGTH = 512


class FormattingError(ValueError):
    """An item that cannot be formatted: wrong shape, wrong types, or no chat template for messages."""


@dataclass(frozen=True)
class Encoded:
    """One item's token ids, and whether it had to be truncated to fit ``max_length``."""

    input_ids: list[int]
    truncated: bool
    original_length: int


@dataclass
class FormattingRecipe:
    """Everything that decides which token ids an item becomes. Stored as ``formatting`` in the manifest."""

    architecture: Architecture
    max_length: int = DEFAULT_MAX_LENGTH
    truncation_side: TruncationSide = "left"
    add_special_tokens: bool = True
    append_eos: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    chat_template_sha256: str | None = None
    prompt_response_join: str = "concatenate"
    # The bos/eos the tokenizer adds is left out when the text already has it there. False in manifests written
    # before the field existed (from_dict's default), so those checkpoints keep the ids they were trained on.
    skip_duplicate_specials: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FormattingRecipe:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def detect_architecture(tokenizer: Any) -> Architecture:
    """Encoders (BERT, MiniLM, RoBERTa, DeBERTa) close every text with their own separator; decoders do not."""
    sep_id = getattr(tokenizer, "sep_token_id", None)
    if sep_id is not None:
        ids = tokenizer("x")["input_ids"]
        if ids and ids[-1] == sep_id:
            return "encoder"
    return "decoder"


def ensure_pad_token(tokenizer: Any, model_config: Any | None = None) -> int:
    """Give the tokenizer a pad token (eos as the fallback) and write its id to the model config.

    Sequence-classification heads find the last non-pad token through ``config.pad_token_id``.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FormattingError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model_config is not None:
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        text_config.pad_token_id = tokenizer.pad_token_id
        model_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


def added_special_tokens(tokenizer: Any) -> tuple[int | None, int | None]:
    """The ``bos`` and ``eos`` ids that ``add_special_tokens=True`` puts around a text (None where it adds none)."""
    with_specials = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    added_bos = bos if bos is not None and with_specials[:1] == [bos] and without[:1] != [bos] else None
    added_eos = eos if eos is not None and with_specials[-1:] == [eos] and without[-1:] != [eos] else None
    return added_bos, added_eos


def recipe_for(
    tokenizer: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    truncation_side: TruncationSide = "left",
    architecture: Architecture | None = None,
) -> FormattingRecipe:
    """The default recipe for a tokenizer: what TRL does, minus its encoder pitfalls."""
    arch = architecture or detect_architecture(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is what apply_chat_template uses
        template = template.get("default")
    notes: list[str] = []
    append_eos = False
    if arch == "decoder":
        if tokenizer.eos_token_id is None:
            notes.append("decoder tokenizer without an eos token: nothing is appended")
        else:
            append_eos = True
            if tokenizer.pad_token_id == tokenizer.eos_token_id:
                notes.append(
                    "pad is eos: the head reads the reward at the last non-pad token, i.e. the token before the "
                    "appended eos (as in TRL); training and serving agree"
                )
    else:
        notes.append("encoder: single-segment encoding with the tokenizer's own special tokens, no eos appended")
    added_bos, added_eos = added_special_tokens(tokenizer)
    if added_bos is not None:
        notes.append("a text that already starts with bos (e.g. a pre-templated prompt) gets no second bos")
    return FormattingRecipe(
        architecture=arch,
        max_length=int(max_length),
        truncation_side=truncation_side,
        append_eos=append_eos,
        eos_token_id=tokenizer.eos_token_id if append_eos else None,
        pad_token_id=tokenizer.pad_token_id,
        chat_template=template,
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if template else None,
        skip_duplicate_specials=True,
        notes=notes,
    )


def item_shape(item: Mapping[str, Any]) -> str:
    """Which of the three shapes an item has; raises :class:`FormattingError` for none or a mix."""
    present = [k for k in ("text", "prompt", "response", "messages") if item.get(k) is not None]
    if present == ["text"]:
        return "text"
    if present == ["prompt", "response"]:
        return "prompt_response"
    if present == ["messages"]:
        return "messages"
    if not present:
        raise FormattingError("an item needs one of: 'text', 'prompt' + 'response', or 'messages'")
    raise FormattingError(f"an item must have exactly one shape, got fields {present}")


class Formatter:
    """Turns items into token ids under one recipe. Thread-safe: it only reads the tokenizer."""

    def __init__(self, tokenizer: Any, recipe: FormattingRecipe):
        if recipe.max_length < 2:
            raise FormattingError(f"max_length must be at least 2, got {recipe.max_length}")
        self.tokenizer = tokenizer
        self.recipe = recipe
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        added = (
            added_special_tokens(tokenizer) if recipe.skip_duplicate_specials and recipe.add_special_tokens else None
        )
        self._added_bos, self._added_eos = added or (None, None)

    # -- items ---------------------------------------------------------------------------------------------
    def encode(self, item: Mapping[str, Any]) -> Encoded:
        """One item (``text`` | ``prompt`` + ``response`` | ``messages``) to token ids."""
        shape = item_shape(item)
        if shape == "text":
            return self.encode_text(_require_str(item["text"], "text"))
        if shape == "prompt_response":
            return self.encode_text(_require_str(item["prompt"], "prompt") + _require_str(item["response"], "response"))
        return self.encode_messages(item["messages"])

    def encode_text(self, text: str) -> Encoded:
        ids = list(self.tokenizer(text, add_special_tokens=self.recipe.add_special_tokens, verbose=False)["input_ids"])
        # The tokenizer put its bos in front (eos behind); a text that already had one keeps only its own.
        if self._added_bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self._added_bos:
            del ids[0]
        if self._added_eos is not None and len(ids) >= 2 and ids[-1] == ids[-2] == self._added_eos:
            del ids[-1]
        if self.recipe.append_eos and (not ids or ids[-1] != self.recipe.eos_token_id):
            ids.append(self.recipe.eos_token_id)
        return self._fit(ids)

    def encode_messages(self, messages: Any) -> Encoded:
        messages = _require_messages(messages)
        if not self.recipe.chat_template:
            raise FormattingError("this model has no chat template, so 'messages' items cannot be scored; send 'text'")
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.recipe.chat_template, tokenize=True, return_dict=True
        )
        return self._fit(list(rendered["input_ids"]))

    # -- preference rows (training, evaluation) --------------------------------------------------------------
    def encode_pair(self, row: Mapping[str, Any]) -> tuple[Encoded, Encoded]:
        """A preference row (``chosen``/``rejected``, optional ``prompt``; strings or message lists)."""
        return self.encode(pair_side(row, "chosen")), self.encode(pair_side(row, "rejected"))

    # -- truncation ------------------------------------------------------------------------------------------
    def _fit(self, ids: list[int]) -> Encoded:
        limit = self.recipe.max_length
        n = len(ids)
        if n <= limit:
            return Encoded(ids, False, n)
        head = 0
        while head < n and ids[head] in self._special_ids:
            head += 1
        tail = 0
        while tail < n - head and ids[n - 1 - tail] in self._special_ids:
            tail += 1
        keep = limit - head - tail
        if keep < 1:  # pathological: mostly special tokens; plain cut on the configured side
            body = ids[-limit:] if self.recipe.truncation_side == "left" else ids[:limit]
            return Encoded(body, True, n)
        body = ids[head : n - tail]
        body = body[-keep:] if self.recipe.truncation_side == "left" else body[:keep]
        return Encoded(ids[:head] + body + ids[n - tail :], True, n)


def pair_side(row: Mapping[str, Any], side: str) -> dict[str, Any]:
    """One side of a preference row as an item, with TRL's explicit-prompt semantics (prompt + side)."""
    value = row.get(side)
    if value is None:
        raise FormattingError(f"missing column '{side}'")
    prompt = row.get("prompt")
    if isinstance(value, str):
        if prompt is None:
            return {"text": value}
        return {"prompt": _require_str(prompt, "prompt"), "response": value}
    if isinstance(value, list):
        messages = (list(prompt) if isinstance(prompt, list) else []) + value
        if isinstance(prompt, str):
            raise FormattingError("a text 'prompt' cannot be combined with message-list answers")
        return {"messages": messages}
    raise FormattingError(f"'{side}' must be a string or a list of messages, got {type(value).__name__}")


def _require_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise FormattingError(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _require_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise FormattingError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise FormattingError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise FormattingError(f"messages[{i}].role must be a string")
        if not isinstance(content, str):
            raise FormattingError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out
