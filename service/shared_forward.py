"""The torch forward for causal (decoder) reward models that computes shared prompt prefixes once.

For the items of one forward (see :mod:`service.prefix`):

1. each item is cut after the token its score is read at (the last non-pad token: nothing after it changes a
   causal model's score), and exact duplicates are computed once;
2. items sharing a prefix of their token ids (decided on the final ids, after truncation) form a group: the prefix
   runs once, batch of one, keeping its keys and values (or they come from the cross-request prefix cache, or a
   cached shorter prefix is extended); then the members' suffixes run as one right-padded batch against those keys
   and values, each member's reward read at its own last token;
3. the items sharing nothing run as one right-padded batch, as without sharing; with the cache on, each one's keys
   and values are kept, so that the siblings of a GRPO group sent one text per request (OpenRLHF >= 0.9.1, slime)
   find their prompt computed when they arrive within seconds. When a sibling shows where the shared part ends,
   the entry is cut down to it.

Right padding needs no attention mask here: a real position attends only to positions before it, all real.
The reward is the model's own head (``score``) on the base model's last hidden state at the read position, which
is what ``*ForSequenceClassification`` computes: every score equals the item's score computed alone, up to float
rounding (checked to 1e-5 in float32 by the tests). Used for transformers' generic sequence classifiers (Llama,
Qwen2, Qwen3, Mistral, ...) whose layers all attend to the full past (no sliding window); see :func:`unavailable`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.prefix import BLOCK_TOKENS, CacheEntry, PrefixCache, plan_groups, read_length

# A group's extra forward, in tokens: grouping items that share less than this saves nothing measurable.
GROUP_OVERHEAD_TOKENS = BLOCK_TOKENS


def unavailable(model: Any) -> str | None:
    """Why ``model``'s prompt prefixes cannot be shared, or None when they can."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        from transformers.modeling_layers import GenericForSequenceClassification
    except ImportError as exc:  # pragma: no cover - an older transformers
        return f"this transformers has no generic sequence classifier ({exc})"
    if not isinstance(model, GenericForSequenceClassification) or not hasattr(model, "score"):
        return f"{type(model).__name__} is not a causal (decoder) sequence classifier: encoders attend both ways"
    config = model.config.get_text_config(decoder=True)
    if not getattr(config, "is_causal", True):
        return "the model is configured for bidirectional attention"
    layer_types = set(get_layer_types_and_kwargs(config)[0])
    if layer_types != {"full_attention"}:
        return f"layers other than full attention ({sorted(layer_types)}): a sliding window forgets the prefix"
    return None


@dataclass(frozen=True)
class SharingStats:
    tokens_scored: int  # tokens of the items handed to the forward
    tokens_computed: int  # tokens that ran through the model (shared prefixes once, cached ones not at all)
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    cache_bytes: int
    cache_entries: int
    cache_capacity_bytes: int


class TorchSteps:
    """The three computations prefix sharing needs, by transformers' own modules (the base model and its ``score``
    head). Keys and values (``kv``) are a list of (keys, values) tensors per layer, batch of one."""

    def __init__(self, checkpoint: Any):
        model = checkpoint.model
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.head = model.score
        self.label_index = checkpoint.label_index
        pad = model.config.get_text_config().pad_token_id
        self.fill = pad if pad is not None else 0

    def context(self) -> Any:
        import torch

        return torch.inference_mode()

    def prefix(self, ids: Sequence[int], past: Any | None) -> Any:
        """Keys and values of ``past`` followed by ``ids``."""
        import torch

        input_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=self.model.device)
        cache = _dynamic_cache(past) if past is not None else None
        out = self.base(input_ids=input_ids, cache=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in out.cache.layers]

    def prefix_and_suffixes(self, ids: Sequence[int], past: Any | None, suffixes: list[Sequence[int]]) -> tuple:
        """The keys and values of ``past`` followed by ``ids``, and the reward of each of ``suffixes`` after them."""
        kv = self.prefix(ids, past)
        return kv, self.suffixes(suffixes, kv)

    def suffixes(self, suffixes: list[Sequence[int]], kv: Any) -> list[float]:
        """The reward of each of ``suffixes`` after the prefix ``kv``: one right-padded batch against its keys and
        values (expanded, not copied, to the batch)."""
        n = len(suffixes)
        cache = _dynamic_cache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
        out = self.base(input_ids=self._padded(suffixes), cache=cache, use_cache=True)
        return self._read(out.last_hidden_state, [len(s) for s in suffixes])

    def alone(self, items: list[Sequence[int]], keep: bool) -> tuple[list[float], list[Any] | None]:
        """The rewards of ``items`` in one right-padded forward, and with ``keep`` each one's keys and values."""
        out = self.base(input_ids=self._padded(items), use_cache=keep)
        scores = self._read(out.last_hidden_state, [len(ids) for ids in items])
        if not keep:
            return scores, None
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        kvs = [
            [(k[row : row + 1, :, : len(ids)], v[row : row + 1, :, : len(ids)]) for k, v in layers]
            for row, ids in enumerate(items)
        ]
        return scores, [self.clone(kv) for kv in kvs]

    @staticmethod
    def sliced(kv: Any, length: int) -> Any:
        return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]

    @staticmethod
    def clone(kv: Any) -> Any:
        return [(k.clone(), v.clone()) for k, v in kv]

    @staticmethod
    def nbytes(kv: Any) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)

    def _padded(self, items: list[Sequence[int]]) -> Any:
        import torch

        input_ids = torch.full((len(items), max(len(ids) for ids in items)), self.fill, dtype=torch.long)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        return input_ids.to(self.model.device)

    def _read(self, hidden: Any, lengths: list[int]) -> list[float]:
        """The reward at each row's last real position."""
        import torch

        rows = torch.arange(len(lengths), device=hidden.device)
        last = torch.as_tensor([n - 1 for n in lengths], device=hidden.device)
        logits = self.head(hidden[rows, last])
        return [float(x) for x in logits[:, self.label_index].float().cpu()]


class PrefixSharingForward:
    """``forward(list of token-id lists) -> list of floats`` computing shared prefixes once (module docstring).

    ``steps`` computes (:class:`TorchSteps` by default; the ONNX Runtime decoder graph provides the same three
    steps); this class decides what to compute and keeps the cache."""

    shares_prefixes = True

    def __init__(
        self,
        checkpoint: Any,
        version: str,
        *,
        cache_bytes: int,
        steps: Any = None,
        min_shared: int = BLOCK_TOKENS,
        overhead_tokens: int = GROUP_OVERHEAD_TOKENS,
    ):
        self.steps = steps if steps is not None else TorchSteps(checkpoint)
        self.pad_token_id = checkpoint.model.config.get_text_config().pad_token_id
        self.min_shared = min_shared
        self.overhead_tokens = overhead_tokens
        self.cache = PrefixCache(cache_bytes, namespace=version)
        self._lock = threading.Lock()
        self._scored = 0
        self._computed = 0

    @property
    def pads_batches(self) -> bool:
        """Whether texts computed together are padded to the longest (torch) or each run alone (ONNX Runtime)."""
        return getattr(self.steps, "pads_batches", True)

    # -- what the service shows ----------------------------------------------------------------------------
    def stats(self) -> SharingStats:
        c = self.cache.stats()
        with self._lock:
            scored, computed = self._scored, self._computed
        return SharingStats(scored, computed, c.hits, c.misses, c.evictions, c.bytes, c.entries, c.capacity_bytes)

    def describe(self) -> dict[str, Any]:
        cache = f"{self.cache.capacity_bytes // 2**20} MiB" if self.cache.enabled else "off"
        return {"prefix_sharing": "in each forward and across requests", "prefix_cache": cache}

    # -- the forward ---------------------------------------------------------------------------------------
    def __call__(self, batch: Sequence[Sequence[int]]) -> list[float]:
        with self.steps.context():
            return self._forward(batch)

    def _forward(self, batch: Sequence[Sequence[int]]) -> list[float]:
        read = [tuple(ids[: read_length(ids, self.pad_token_id)]) for ids in batch]
        unique = list(dict.fromkeys(read))  # exact duplicates are computed once
        scores: dict[tuple[int, ...], float] = {}
        computed = 0
        alone: list[tuple[int, ...]] = []
        for group in plan_groups(unique, min_shared=self.min_shared, overhead_tokens=self.overhead_tokens):
            members = [unique[i] for i in group.members]
            if group.prefix:
                computed += self._group(members, group.prefix, scores)
                continue
            for ids in members:  # shares nothing in this forward: maybe with an earlier one
                entry, shared = self.cache.lookup(ids, min_shared=self.min_shared)
                prefix = min(shared, len(ids) - 1)
                if entry is None or prefix < self.min_shared:
                    alone.append(ids)
                    continue
                computed += self._group([ids], prefix, scores, (entry, shared))
        if alone:
            computed += self._alone(alone, scores)
        with self._lock:
            self._scored += sum(len(ids) for ids in batch)
            self._computed += computed
        return [scores[ids] for ids in read]

    def _group(
        self,
        members: list[tuple[int, ...]],
        prefix: int,
        scores: dict[tuple[int, ...], float],
        hit: tuple[CacheEntry, int] | None = None,
    ) -> int:
        """Score ``members`` (sharing their first ``prefix`` tokens); the tokens computed."""
        steps = self.steps
        prefix_ids = members[0][:prefix]
        entry, shared = hit if hit is not None else self.cache.lookup(prefix_ids, min_shared=self.min_shared)
        known = min(shared, prefix) if entry is not None else 0
        computed = 0
        if entry is not None and entry.payload[1] and shared < len(entry.ids) and shared >= self.min_shared:
            # A whole text's keys and values, of which a sibling shares only the first `shared`: keep just those.
            whole = entry.payload[0]

            def trimmed() -> tuple[Any, int]:
                kept = steps.clone(steps.sliced(whole, shared))
                return (kept, False), steps.nbytes(kept)

            self.cache.replace(entry, entry.ids[:shared], trimmed)
        suffixes = [ids[prefix:] for ids in members]
        if entry is not None and known == prefix:
            rewards = steps.suffixes(suffixes, steps.sliced(entry.payload[0], prefix))
        else:
            past = steps.sliced(entry.payload[0], known) if entry is not None and known else None
            kv, rewards = steps.prefix_and_suffixes(prefix_ids[known:], past, suffixes)
            computed += prefix - known
            if self.cache.enabled:
                self.cache.put(prefix_ids, (kv, False), steps.nbytes(kv))
        for ids, score in zip(members, rewards, strict=True):
            scores[ids] = score
        return computed + sum(len(s) for s in suffixes)

    def _alone(self, items: list[tuple[int, ...]], scores: dict[tuple[int, ...], float]) -> int:
        """Score items sharing nothing; keep the keys and values of each one long enough to share, when caching."""
        keep = self.cache.enabled and any(len(ids) > self.min_shared for ids in items)
        computed_scores, kvs = self.steps.alone(items, keep)
        for ids, score in zip(items, computed_scores, strict=True):
            scores[ids] = score
        for ids, kv in zip(items, kvs or [], strict=False):
            if len(ids) > self.min_shared:
                self.cache.put(ids, (kv, True), self.steps.nbytes(kv))
        return sum(len(ids) for ids in items)


def _dynamic_cache(kv: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)
