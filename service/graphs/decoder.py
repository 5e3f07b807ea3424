"""The ONNX graph of a causal (decoder) reward model with past keys and values, and the last layer only where the
reward is read.

One graph serves the steps of prefix sharing (:class:`service.shared_forward.PrefixSharingForward`):

    inputs:  input_ids (batch, new), positions (new,), mask (new, past + new), past_keys, past_values
             (layers, batch, kv heads, past, head size), last (batch, reads): where each row's rewards are read
    outputs: reward (batch, reads), keys, values (layers, batch, kv heads, new, head size): the new tokens' only

``past`` may be 0 (a text computed whole). Every layer but the last runs over the new tokens; the last layer forms
keys and values for all of them (they are kept for later texts), but its query, attention output and feed-forward
only at ``last``: nothing else of the last layer reaches the reward. ``positions`` and ``mask`` are the caller's,
shared by the rows: the causal mask offset by ``past`` for right-padded rows, or one row holding several texts
after a common prefix, each seeing only the prefix and itself (:func:`service.decoder_session.packed_inputs`),
read at several places. Written for the Llama family's layer (Llama, Mistral, Qwen2, Qwen3 with its query and key
norms), from the model's own modules, and checked against torch before use (``service.decoder_session.load``).
"""

from __future__ import annotations

from typing import Any

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


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _heads(projection: Any, norm: Any, x: Any, count: int, size: int) -> Any:
    """(batch, count, tokens, size) from (batch, tokens, width), with Qwen3's per-head norm when it has one."""
    y = projection(x).view(x.shape[0], x.shape[1], count, size)
    return (norm(y) if norm is not None else y).transpose(1, 2)


def _attention(layer: Any, x: Any, queries: Any, rope: tuple, query_rope: tuple, mask: Any, past: tuple) -> tuple:
    """One layer's attention: keys and values of ``x`` after ``past``'s, queries of ``queries``; returns the
    output projection and the keys and values of ``x``. Query heads are grouped under their key/value head."""
    import torch

    attn = layer.self_attn
    heads, kv_heads, size = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    group = heads // kv_heads
    new_keys = _rotate(_heads(attn.k_proj, getattr(attn, "k_norm", None), x, kv_heads, size), *rope)
    new_values = _heads(attn.v_proj, None, x, kv_heads, size)
    keys, values = torch.cat([past[0], new_keys], 2), torch.cat([past[1], new_values], 2)
    q = _rotate(_heads(attn.q_proj, getattr(attn, "q_norm", None), queries, heads, size), *query_rope)
    batch, _, count, _ = q.shape
    q = q.reshape(batch, kv_heads, group * count, size)
    weights = (q @ keys.transpose(-1, -2) * attn.scaling).view(batch, kv_heads, group, count, -1) + mask
    context = (weights.softmax(-1).view(batch, kv_heads, group * count, -1) @ values).view(batch, heads, count, size)
    return attn.o_proj(context.transpose(1, 2).reshape(batch, count, heads * size)), new_keys, new_values


def _forward(base: Any, score: Any, label_index: int, inputs: tuple) -> tuple:
    """The graph's arithmetic (module docstring) on ``inputs`` = (input_ids, positions, mask, past_keys,
    past_values, last)."""
    import torch

    input_ids, positions, mask, past_keys, past_values, last = inputs
    hidden = base.embed_tokens(input_ids)
    cos, sin = base.rotary_emb(hidden, positions[None])
    rope = (cos[:, None], sin[:, None])  # (1, 1, new, size)
    *inner, final = base.layers
    new_keys, new_values = [], []
    for index, layer in enumerate(inner):
        x = layer.input_layernorm(hidden)
        past = (past_keys[index], past_values[index])
        out, k, v = _attention(layer, x, x, rope, rope, mask[None, None, None], past)
        hidden = hidden + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        new_keys.append(k)
        new_values.append(v)
    x = final.input_layernorm(hidden)
    read = last[:, :, None].expand(-1, -1, x.shape[-1])
    at = x.gather(1, read)  # (batch, reads, width): the last layer's queries at the read positions only
    query_rope = (cos[0][last][:, None], sin[0][last][:, None])  # (batch, 1, reads, size)
    row_mask = mask[last][:, None, None]  # (batch, 1, 1, reads, past + new)
    past = (past_keys[len(inner)], past_values[len(inner)])
    out, k, v = _attention(final, x, at, rope, query_rope, row_mask, past)
    h = hidden.gather(1, read) + out
    h = h + final.mlp(final.post_attention_layernorm(h))
    reward = score(base.norm(h))[..., label_index]
    return reward, torch.stack([*new_keys, k]), torch.stack([*new_values, v])


def reward_graph(model: Any, label_index: int) -> Any:
    """The torch module exported as the decoder graph (module docstring)."""
    import torch

    from service.graphs.base import require

    base = getattr(model, model.base_model_prefix)
    require(base, "embed_tokens", "rotary_emb", "layers", "norm", graph=GRAPH)
    for path in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim", "config"):
        require(base.layers[0].self_attn, path, graph=GRAPH)
    require(base.layers[0], "input_layernorm", "post_attention_layernorm", "mlp", graph=GRAPH)

    class DecoderReward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.score = model.score

        def forward(self, input_ids, positions, mask, past_keys, past_values, last):
            inputs = (input_ids, positions, mask, past_keys, past_values, last)
            return _forward(self.base, self.score, label_index, inputs)

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


def sample_inputs(model: Any) -> tuple[dict[str, Any], dict[str, dict[int, str]]]:
    """Inputs to trace the graph on (with a past and two rows, so that neither is fixed in the graph) and the
    dynamic axes of its inputs and outputs."""
    import torch

    batch, past, new = 2, 3, 4
    inputs = {
        "input_ids": torch.randint(3, 50, (batch, new)),
        "positions": torch.arange(past, past + new),
        "mask": torch.from_numpy(causal_mask(past, new)),
        "past_keys": torch.zeros(kv_shape(model, batch, past)),
        "past_values": torch.zeros(kv_shape(model, batch, past)),
        "last": torch.tensor([[new - 1, 1], [2, 0]]),
    }
    kv_axes = {1: "batch", 3: "past"}
    axes = {
        "input_ids": {0: "batch", 1: "new"},
        "positions": {0: "new"},
        "mask": {0: "new", 1: "total"},
        "past_keys": kv_axes,
        "past_values": kv_axes,
        "last": {0: "batch", 1: "reads"},
        "reward": {0: "batch", 1: "reads"},
        "keys": {1: "batch", 3: "new"},
        "values": {1: "batch", 3: "new"},
    }
    return inputs, axes
