"""Shared prompt prefixes for causal (decoder) reward models: which items share what, and a bounded cache of the
keys and values of prefixes already computed.

GRPO scores every prompt with G completions, so the same prompt tokens arrive G times. In a causal model a
position's keys, values and hidden states depend only on the tokens up to it, so items whose token ids start alike
can compute that common prefix once and their suffixes against its keys and values, and the score (read at the
last non-pad token) is the one the item gets alone, up to float rounding. Encoders (BERT and the like) attend in
both directions: every position depends on every other, nothing can be shared, and their path is untouched.

This module is pure bookkeeping, without torch: :func:`read_length` (how much of an item the score depends on),
:func:`plan_groups` (which items of one forward share a prefix, and how long a one), and :class:`PrefixCache` (an
LRU of computed prefixes, bounded by bytes, looked up by the longest common prefix of token ids).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Prefix lookups are indexed by blocks of this many tokens (a chained hash per full block); shorter shared prefixes
# are not worth a second forward anyway.
BLOCK_TOKENS = 16


def read_length(ids: Sequence[int], pad_token_id: int | None) -> int:
    """How many leading tokens the score depends on: up to the last token that is not padding.

    A sequence-classification head in transformers reads the rightmost token that is not ``pad_token_id`` (so with
    pad = eos, the token before an appended eos); in a causal model nothing after it changes the score. A sequence
    of padding only is read at position 0, as transformers does; without a pad token the last position is read.
    """
    if pad_token_id is None:
        return len(ids)
    for position in range(len(ids) - 1, -1, -1):
        if ids[position] != pad_token_id:
            return position + 1
    return 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Group:
    """Items (indices) that compute their first ``prefix`` tokens once; ``prefix`` 0: each computed whole."""

    prefix: int
    members: tuple[int, ...]


def plan_groups(sequences: Sequence[Sequence[int]], *, min_shared: int, overhead_tokens: int) -> list[Group]:
    """Partition distinct ``sequences`` into groups sharing a prefix, computing as few tokens as possible.

    The sequences are sorted; a group is a run of neighbours in that order, its prefix their common prefix (at most
    one token short of its shortest member, so that every member has a token of its own to read the score at).
    Computing a group costs its prefix once, each member's suffix, and ``overhead_tokens`` for its extra forward;
    a sequence left alone costs its length (the lone ones share one padded forward). The cheapest partition is
    found exactly (dynamic programming over the sorted order); a group needs a prefix of at least ``min_shared``.
    Every index appears in exactly one group; lone sequences come last, together, with ``prefix`` 0.
    """
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    n = len(order)
    lengths = [len(sequences[i]) for i in order]
    adjacent = [common_prefix(sequences[order[k]], sequences[order[k + 1]]) for k in range(n - 1)]
    best = [0.0] * (n + 1)  # best[j]: cheapest cost of the first j sorted sequences
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last group, its prefix; 0 = alone)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1] + lengths[j - 1], (j - 1, 0)
        shared, shortest, total = 1 << 62, lengths[j - 1], lengths[j - 1]
        for start in range(j - 2, -1, -1):  # the group order[start:j]
            shared = min(shared, adjacent[start])
            shortest = min(shortest, lengths[start])
            total += lengths[start]
            prefix = min(shared, shortest - 1)
            if prefix < min_shared:
                break  # the common prefix only shrinks as the group grows
            cost = best[start] + prefix + (total - prefix * (j - start)) + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, (start, prefix)
    groups, alone = [], []
    j = n
    while j > 0:
        start, prefix = cut[j]
        if prefix:
            groups.append(Group(prefix, tuple(order[start:j])))
        else:
            alone.append(order[start])
        j = start
    groups.reverse()
    if alone:
        groups.append(Group(0, tuple(sorted(alone))))
    return groups


# -- the cross-request cache -------------------------------------------------------------------------------------
@dataclass(eq=False)
class CacheEntry:
    """Computed keys and values (``payload``, opaque here) of the token ids ``ids``; ``nbytes`` of memory."""

    ids: tuple[int, ...]
    payload: Any
    nbytes: int
    hashes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    capacity_bytes: int


def block_hashes(ids: Sequence[int]) -> list[int]:
    """A chained hash per full block of :data:`BLOCK_TOKENS`: the k-th names ``ids[: (k + 1) * BLOCK_TOKENS]``."""
    out: list[int] = []
    h = 0
    for end in range(BLOCK_TOKENS, len(ids) + 1, BLOCK_TOKENS):
        h = hash((h, tuple(ids[end - BLOCK_TOKENS : end])))
        out.append(h)
    return out


class PrefixCache:
    """Keys and values of token-id prefixes already computed, least recently used first out, at most
    ``capacity_bytes``; one model version (``namespace``) per cache, so another model's entries never match.

    :meth:`lookup` returns the entry sharing the longest prefix with the ids asked for (found through chained block
    hashes, then checked token by token, so a hash collision costs nothing but a shorter match). Thread-safe: the
    inference workers share one cache; entries are never modified once stored, only replaced.
    """

    def __init__(self, capacity_bytes: int, namespace: Hashable = None):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.namespace = namespace
        self._entries: OrderedDict[tuple[int, ...], CacheEntry] = OrderedDict()
        self._index: dict[int, dict[tuple[int, ...], None]] = {}  # block hash -> entries holding that block prefix
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.hits, self.misses, self.evictions, self._bytes, len(self._entries), self.capacity_bytes
            )

    def lookup(self, ids: Sequence[int], *, min_shared: int) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with ``ids`` (at least ``min_shared`` tokens) and that length, or
        (None, 0); counts a hit or a miss."""
        if not self.enabled:
            return None, 0
        hashes = block_hashes(ids)
        with self._lock:
            found: CacheEntry | None = None
            for h in hashes:
                keys = self._index.get(h)
                if not keys:
                    break
                found = self._entries[next(reversed(keys))]
            shared = common_prefix(found.ids, ids) if found is not None else 0
            if found is None or shared < min_shared:
                self.misses += 1
                return None, 0
            self._entries.move_to_end(found.ids)
            self.hits += 1
            return found, shared

    def put(self, ids: Sequence[int], payload: Any, nbytes: int) -> bool:
        """Store ``payload`` (the keys and values of ``ids``), evicting the least recently used entries to fit.
        False when it is larger than the whole cache (then nothing changes)."""
        key = tuple(ids)
        if not self.enabled or nbytes > self.capacity_bytes:
            return False
        entry = CacheEntry(key, payload, nbytes, block_hashes(key))
        with self._lock:
            if key in self._entries:
                self._remove(self._entries[key])
            while self._bytes + nbytes > self.capacity_bytes and self._entries:
                self._remove(next(iter(self._entries.values())))
                self.evictions += 1
            self._entries[key] = entry
            self._bytes += nbytes
            for h in entry.hashes:
                self._index.setdefault(h, {})[key] = None
        return True

    def replace(self, old: CacheEntry, ids: Sequence[int], make_payload: Callable[[], tuple[Any, int]]) -> None:
        """Swap ``old`` for the shorter prefix ``ids`` of it (whose payload ``make_payload`` builds): once siblings
        showed where the shared prompt ends, the rest of the first text's keys and values is not worth its memory."""
        with self._lock:
            if self._entries.get(old.ids) is not old:
                return  # evicted or replaced meanwhile
            self._remove(old)
        payload, nbytes = make_payload()
        self.put(ids, payload, nbytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._bytes = 0

    def _remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.ids]
        self._bytes -= entry.nbytes
        for h in entry.hashes:
            keys = self._index.get(h)
            if keys is not None:
                keys.pop(entry.ids, None)
                if not keys:
                    del self._index[h]
