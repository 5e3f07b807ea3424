"""The ONNX Runtime session of the decoder graph (:mod:`service.graphs.decoder`): exported once and cached like
every graph (:mod:`service.onnx_session`), checked against torch, and run as prefix sharing's three steps."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.graphs.decoder import GRAPH, kv_shape, reward_graph, sample_inputs, unavailable
from service.onnx_session import (
    CHECK_TEXTS,
    MAX_SCORE_DIFF,
    OnnxUnavailable,
    cache_key,
    cache_path,
    cpu_session,
    unavailable_reason,
    write_graph,
)
from service.shared_forward import PrefixSharingForward

logger = logging.getLogger("reward.backend")

# Tokens packed into one ONNX Runtime call (OnnxSteps): 192, 256 and 384 measured alike on SmolLM2-135M shapes, one
# thread.
PACK_TOKENS = 256


def export(checkpoint: Any, path: Path) -> Path:
    inputs, axes = sample_inputs(checkpoint.model)
    module = reward_graph(checkpoint.model, checkpoint.label_index)
    return write_graph(module, inputs, ["reward", "keys", "values"], axes, path)


class OnnxSteps:
    """Prefix sharing's three steps (see :class:`service.shared_forward.TorchSteps`) through the decoder graph.

    Nothing is padded (on a CPU, padding costs more than a call): a group's completions are packed one after
    another into a single row, each attending to the prefix and to its own tokens only (:func:`packed_inputs`),
    in runs of up to ``pack_tokens`` tokens, the first of them also computing the prefix when it is not cached.
    Every ONNX Runtime call reads all the weights, so a few long calls beat one short call per completion; a row's
    attention over its neighbours' tokens (masked, but computed) grows with the square of its length, so rows stay a
    few hundred tokens long. Texts that share nothing run alone. Keys and values are numpy arrays (layers, 1, kv
    heads, tokens, size)."""

    pads_batches = False

    def __init__(self, path: Path, model: Any, threads: int, *, pack_tokens: int = PACK_TOKENS):
        import numpy as np

        self.session = cpu_session(path, threads)
        self.path = path
        self.graph = GRAPH
        self.pack_tokens = pack_tokens
        self.empty = np.zeros(kv_shape(model, 1, 0), dtype=np.float32)

    def context(self) -> Any:
        return contextlib.nullcontext()

    def run(self, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], past: tuple[Any, Any] | None) -> tuple:
        """One ONNX Runtime call of ``prefix`` then ``suffixes`` packed, after ``past``: the reward at the end of each
        suffix (of the prefix when there is none) and the keys and values of the prefix, past included."""
        import numpy as np

        keys, values = past if past is not None else (self.empty, self.empty)
        positions, mask, last = packed_inputs(keys.shape[3], len(prefix), [len(s) for s in suffixes])
        ids = [*prefix, *(token for s in suffixes for token in s)]
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "positions": positions,
            "mask": mask,
            "past_keys": np.ascontiguousarray(keys),
            "past_values": np.ascontiguousarray(values),
            "last": last[None],
        }
        reward, new_keys, new_values = self.session.run(None, feeds)
        scores = [float(r) for r in reward[0]]
        if not prefix:
            return scores, past
        kept = [np.ascontiguousarray(kv[:, :, :, : len(prefix)]) if suffixes else kv for kv in (new_keys, new_values)]
        if past is not None:
            kept = [np.concatenate([old, new], axis=3) for old, new in zip((keys, values), kept, strict=True)]
        return scores, (kept[0], kept[1])

    def prefix_and_suffixes(self, ids: Sequence[int], past: Any | None, suffixes: list[Sequence[int]]) -> tuple:
        """The keys and values of ``past`` and ``ids``, and the rewards of ``suffixes`` after them; the prefix
        runs in one row with the first of the suffixes."""
        bins = self._bins(suffixes, len(ids))
        scores, kv = self.run(ids, bins[0], past)
        return kv, scores + self._suffix_bins(bins[1:], kv)

    def suffixes(self, suffixes: list[Sequence[int]], kv: Any) -> list[float]:
        return self._suffix_bins(self._bins(suffixes), kv)

    def alone(self, items: list[Sequence[int]], keep: bool) -> tuple[list[float], list[Any] | None]:
        out = [self.run(ids, [], None) for ids in items]
        return [r[0] for r, _ in out], ([kv for _, kv in out] if keep else None)

    def _suffix_bins(self, bins: list[list[Sequence[int]]], kv: Any) -> list[float]:
        return [score for part in bins for score in self.run([], part, kv)[0]]

    def _bins(self, suffixes: list[Sequence[int]], tokens: int = 0) -> list[list[Sequence[int]]]:
        """``suffixes`` in order, cut into runs of at most ``pack_tokens`` tokens, the first after ``tokens`` of a
        prefix (a suffix longer than that alone, the first with the prefix)."""
        bins: list[list[Sequence[int]]] = [[]]
        for suffix in suffixes:
            if bins[-1] and tokens + len(suffix) > self.pack_tokens:
                bins.append([])
                tokens = 0
            bins[-1].append(suffix)
            tokens += len(suffix)
        return bins

    @staticmethod
    def sliced(kv: Any, length: int) -> Any:
        keys, values = kv
        return keys[:, :, :, :length], values[:, :, :, :length]

    @staticmethod
    def clone(kv: Any) -> Any:
        return kv[0].copy(), kv[1].copy()

    @staticmethod
    def nbytes(kv: Any) -> int:
        return int(kv[0].nbytes + kv[1].nbytes)


def packed_inputs(past: int, prefix: int, suffixes: Sequence[int]) -> tuple[Any, Any, Any]:
    """Positions, mask and read positions of one row holding ``prefix`` tokens then suffixes of the lengths
    ``suffixes``, after ``past`` tokens: every token sees the past, the prefix tokens up to itself, and the tokens of
    its own suffix up to itself, at the position it would have in its text alone; each suffix is read at its last
    token (the prefix at its own when there is no suffix)."""
    import numpy as np

    starts = np.cumsum([prefix, *suffixes])  # where each suffix ends (the first: where the prefix ends)
    total = int(starts[-1])
    segment = np.repeat(np.arange(len(suffixes) + 1), [prefix, *suffixes])  # 0: the prefix
    begins = np.concatenate([[0], starts[:-1]])[segment]  # where each token's segment begins
    index = np.arange(total)
    positions = past + np.where(segment == 0, index, prefix + index - begins)
    new = (index[None, :] <= index[:, None]) & ((segment[None, :] == segment[:, None]) | (segment[None, :] == 0))
    allowed = np.concatenate([np.ones((total, past), dtype=bool), new], axis=1)
    mask = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    last = starts[1:] - 1 if suffixes else starts[:1] - 1
    return positions.astype(np.int64), mask, last.astype(np.int64)


def load(checkpoint: Any, version: str, threads: int, *, cache_bytes: int) -> Any:
    """The prefix-sharing forward on the decoder graph (exported, or taken from the ONNX cache), checked against
    torch on texts sharing a prefix, texts alone, and a cached prefix. Raises ``OnnxUnavailable``."""
    import numpy as np

    from training.checkpoint import forward_scores

    reason = unavailable_reason(checkpoint.model) or unavailable(checkpoint.model)
    if reason is not None:
        raise OnnxUnavailable(reason)
    path = cache_path(Path(checkpoint.path), cache_key(version, checkpoint.label_index, GRAPH))
    if not path.is_file():
        started = time.perf_counter()
        try:
            export(checkpoint, path)
        except Exception as exc:
            raise OnnxUnavailable(f"export failed: {exc.__class__.__name__}: {exc}") from exc
        logger.info("exported %s to ONNX in %.1f s: %s", checkpoint.name, time.perf_counter() - started, path)
    try:
        steps = OnnxSteps(path, checkpoint.model, threads)
    except OnnxUnavailable:
        raise
    except Exception as exc:  # e.g. a truncated or foreign file in the cache
        raise OnnxUnavailable(f"ONNX Runtime could not load {path}: {exc.__class__.__name__}: {exc}") from exc
    encode = checkpoint.formatter.encode
    prompt = encode({"text": CHECK_TEXTS[1] * 2}).input_ids[:-1]
    texts = [prompt + encode({"text": t}).input_ids[1:] for t in CHECK_TEXTS] + [
        encode({"text": CHECK_TEXTS[0]}).input_ids
    ]
    check = PrefixSharingForward(checkpoint, version, cache_bytes=1 << 26, steps=steps)
    got = check(texts) + check(texts[:1]) + check([texts[0][:1]])
    expected = [forward_scores(checkpoint, [ids])[0] for ids in [*texts, texts[0], texts[0][:1]]]
    worst = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64))))
    if not worst <= MAX_SCORE_DIFF:  # also catches NaN
        raise OnnxUnavailable(f"decoder graph scores differ from torch's by {worst:.3g} (> {MAX_SCORE_DIFF:g})")
    logger.info("ONNX Runtime decoder graph checked against torch (largest difference %.2g): %s", worst, path)
    return PrefixSharingForward(checkpoint, version, cache_bytes=cache_bytes, steps=steps)
