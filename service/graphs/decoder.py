"""The ONNX graph of a causal (decoder) reward model with past keys and values, and the last layer only where the
reward is read.

One graph serves the three steps of prefix sharing (:class:`service.shared_forward.PrefixSharingForward`):

    inputs:  input_ids (batch, new), positions (new,), mask (new, past + new), past_keys, past_values
             (layers, batch, kv heads, past, head size), last (batch,): the position of each row's reward in input_ids
    outputs: reward (batch,), keys, values (layers, batch, kv heads, past + new, head size)

``past`` may be 0 (a text computed whole). Every layer but the last runs over the new tokens; the last layer forms
keys and values for all of them (they are kept for later texts), but its query, attention output and feed-forward
only at ``last``: nothing else of the last layer reaches the reward. Rows are right-padded, so the mask is the
causal one, offset by ``past``. Written for the Llama family's layer (Llama, Mistral, Qwen2, Qwen3 with its query
and key norms), from the model's own modules, and checked against torch before use (:func:`load`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("reward.backend")

GRAPH = "decoder-kv"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unavailable(model: Any) -> str | None:
    """Why ``model`` has no decoder graph here, or None."""
    from service.shared_forward import unavailable as not_shared

    reason = not_shared(model)
    if reason is not None:
        return reason
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"no decoder graph for model type {model_type!r} (only {', '.join(MODEL_TYPES)})"
    return None


def reward_graph(model: Any, label_index: int) -> Any:
    """The torch module exported as the decoder graph (module docstring)."""
    import torch

    from service.graphs.base import require

    base = getattr(model, model.base_model_prefix)
    require(base, "embed_tokens", "rotary_emb", "layers", "norm", graph=GRAPH)
    for path in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"):
        require(base.layers[0].self_attn, path, graph=GRAPH)
    require(base.layers[0], "input_layernorm", "post_attention_layernorm", "mlp", graph=GRAPH)
    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    size = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads

    def rotate(x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def heads_of(projection: Any, norm: Any, x: Any, count: int) -> Any:
        """(batch, count, tokens, size) from (batch, tokens, width), with Qwen3's per-head norm when it has one."""
        y = projection(x).view(x.shape[0], x.shape[1], count, size)
        return (norm(y) if norm is not None else y).transpose(1, 2)

    class DecoderReward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.score = model.score

        def attention(
            self,
            layer: Any,
            x: Any,
            queries: Any,
            cos: Any,
            sin: Any,
            qcos: Any,
            qsin: Any,
            mask: Any,
            past_k: Any,
            past_v: Any,
        ) -> tuple[Any, Any, Any]:
            attn = layer.self_attn
            keys = rotate(heads_of(attn.k_proj, getattr(attn, "k_norm", None), x, kv_heads), cos, sin)
            values = heads_of(attn.v_proj, None, x, kv_heads)
            keys = torch.cat([past_k, keys], dim=2)
            values = torch.cat([past_v, values], dim=2)
            q = rotate(heads_of(attn.q_proj, getattr(attn, "q_norm", None), queries, heads), qcos, qsin)
            batch, _, count, _ = q.shape
            q = q.reshape(batch, kv_heads, group * count, size)  # query heads grouped under their key/value head
            weights = (q @ keys.transpose(-1, -2) * attn.scaling).view(batch, kv_heads, group, count, -1) + mask
            context = (weights.softmax(-1).view(batch, kv_heads, group * count, -1) @ values).view(
                batch, heads, count, size
            )
            return attn.o_proj(context.transpose(1, 2).reshape(batch, count, heads * size)), keys, values

        def forward(self, input_ids, positions, mask, past_keys, past_values, last):
            batch = input_ids.shape[0]
            hidden = self.base.embed_tokens(input_ids)
            cos, sin = self.base.rotary_emb(hidden, positions[None])
            cos, sin = cos[:, None], sin[:, None]  # (1, 1, new, size)
            causal = mask[None, None, None]  # (1, 1, 1, new, past + new)
            rows = torch.arange(batch)
            *inner, final = self.base.layers
            kept_keys, kept_values = [], []
            for index, layer in enumerate(inner):
                x = layer.input_layernorm(hidden)
                out, k, v = self.attention(
                    layer, x, x, cos, sin, cos, sin, causal, past_keys[index], past_values[index]
                )
                hidden = hidden + out
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                kept_keys.append(k)
                kept_values.append(v)
            x = final.input_layernorm(hidden)
            at = x[rows, last][:, None]  # (batch, 1, width): the last layer's queries at the read positions only
            qcos, qsin = cos[0, 0, last][:, None, None], sin[0, 0, last][:, None, None]
            row_mask = mask[last][:, None, None, None]  # (batch, 1, 1, 1, past + new)
            n = len(inner)
            out, k, v = self.attention(final, x, at, cos, sin, qcos, qsin, row_mask, past_keys[n], past_values[n])
            h = hidden[rows, last][:, None] + out
            h = h + final.mlp(final.post_attention_layernorm(h))
            reward = self.score(self.base.norm(h))[:, 0, label_index]
            return reward, torch.stack([*kept_keys, k]), torch.stack([*kept_values, v])

    return DecoderReward().eval()


def causal_mask(past: int, new: int) -> Any:
    """(new, past + new) float32: 0 where a new token may attend, the dtype's lowest value where not."""
    import numpy as np

    allowed = np.arange(past + new)[None, :] <= past + np.arange(new)[:, None]
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)


def kv_shape(model: Any, batch: int, past: int) -> tuple[int, ...]:
    config = model.config.get_text_config()
    size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, batch, config.num_key_value_heads, past, size)


def export(checkpoint: Any, path: Path) -> Path:
    import torch

    from service.onnx_session import write_graph

    model = checkpoint.model
    batch, past, new = 2, 3, 4  # traced with a past and two rows, so that neither is fixed in the graph
    inputs = {
        "input_ids": torch.randint(3, 50, (batch, new)),
        "positions": torch.arange(past, past + new),
        "mask": torch.from_numpy(causal_mask(past, new)),
        "past_keys": torch.zeros(kv_shape(model, batch, past)),
        "past_values": torch.zeros(kv_shape(model, batch, past)),
        "last": torch.tensor([new - 1, 1]),
    }
    kv_axes = {1: "batch", 3: "past"}
    axes = {
        "input_ids": {0: "batch", 1: "new"},
        "positions": {0: "new"},
        "mask": {0: "new", 1: "total"},
        "past_keys": kv_axes,
        "past_values": kv_axes,
        "last": {0: "batch"},
        "reward": {0: "batch"},
        "keys": {1: "batch", 3: "total"},
        "values": {1: "batch", 3: "total"},
    }
    return write_graph(reward_graph(model, checkpoint.label_index), inputs, ["reward", "keys", "values"], axes, path)


class OnnxSteps:
    """Prefix sharing's three steps (see :class:`service.shared_forward.TorchSteps`) through the decoder graph.
    Each text runs on its own, unpadded (as the ONNX full graph does: on a CPU, padding costs more than a call);
    keys and values are numpy arrays (layers, 1, kv heads, tokens, size)."""

    pads_batches = False

    def __init__(self, path: Path, model: Any, threads: int):
        import numpy as np

        from service.onnx_session import cpu_session

        self.session = cpu_session(path, threads)
        self.path = path
        self.graph = GRAPH
        self.empty = np.zeros(kv_shape(model, 1, 0), dtype=np.float32)

    def context(self) -> Any:
        import contextlib

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

    from service.onnx_session import (
        CHECK_TEXTS,
        MAX_SCORE_DIFF,
        OnnxUnavailable,
        cache_key,
        cache_path,
        unavailable_reason,
    )
    from service.shared_forward import PrefixSharingForward
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
