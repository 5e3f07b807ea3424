"""The ONNX Runtime session of the decoder graph (:mod:`service.graphs.decoder`): exported once and cached like
every graph (:mod:`service.onnx_session`), checked against torch, and run as prefix sharing's three steps."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.graphs.decoder import GRAPH, causal_mask, kv_shape, reward_graph, sample_inputs, unavailable
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


def export(checkpoint: Any, path: Path) -> Path:
    inputs, axes = sample_inputs(checkpoint.model)
    module = reward_graph(checkpoint.model, checkpoint.label_index)
    return write_graph(module, inputs, ["reward", "keys", "values"], axes, path)


class OnnxSteps:
    """Prefix sharing's three steps (see :class:`service.shared_forward.TorchSteps`) through the decoder graph.
    Each text runs on its own, unpadded (as the ONNX full graph does: on a CPU, padding costs more than a call);
    keys and values are numpy arrays (layers, 1, kv heads, tokens, size)."""

    pads_batches = False

    def __init__(self, path: Path, model: Any, threads: int):
        import numpy as np

        self.session = cpu_session(path, threads)
        self.path = path
        self.graph = GRAPH
        self.empty = np.zeros(kv_shape(model, 1, 0), dtype=np.float32)

    def context(self) -> Any:
        return contextlib.nullcontext()

    def run(self, ids: Sequence[int], past: tuple[Any, Any] | None) -> tuple[float, Any, Any]:
        import numpy as np

        keys, values = past if past is not None else (self.empty, self.empty)
        start = keys.shape[3]
        row = np.asarray([list(ids)], dtype=np.int64)
        feeds = {
            "input_ids": row,
            "positions": np.arange(start, start + len(ids), dtype=np.int64),
            "mask": causal_mask(start, len(ids)),
            "past_keys": np.ascontiguousarray(keys),
            "past_values": np.ascontiguousarray(values),
            "last": np.asarray([len(ids) - 1], dtype=np.int64),
        }
        reward, new_keys, new_values = self.session.run(None, feeds)
        return float(reward[0]), new_keys, new_values

    def prefix(self, ids: Sequence[int], past: Any | None) -> Any:
        _, keys, values = self.run(ids, past)
        return keys, values

    def suffixes(self, suffixes: list[Sequence[int]], kv: Any) -> list[float]:
        return [self.run(s, kv)[0] for s in suffixes]

    def alone(self, items: list[Sequence[int]], keep: bool) -> tuple[list[float], list[Any] | None]:
        out = [self.run(ids, None) for ids in items]
        return [r for r, _, _ in out], ([(k, v) for _, k, v in out] if keep else None)

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
