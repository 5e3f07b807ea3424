"""The ``bert-cls`` graph: a BERT classifier with its last layer computed for the [CLS] position only.

A BERT classifier reads one position of the last layer (the pooler takes [CLS]), and every other position
contributes to it only through its keys and values, so the last layer's query, attention output and feed-forward
run for one token instead of all of them, and its keys and values are never formed (see :meth:`ClsOnlyLastLayer.
cls_layer`): nearly a sixth of MiniLM-L6's arithmetic is skipped, and the scores are the same up to float rounding
(checked against torch before use).

It is written against transformers' BERT modules (``bert.encoder.layer[i].attention.self.query`` ...): every one of
them is looked up before the graph is built (:data:`INTERNALS`), so a renamed one fails loudly, by name.
"""

from __future__ import annotations

from typing import Any

import torch

from service.graphs.base import Graph, require

NAME = "bert-cls"

# What the graph reads of the model and of each of its layers.
MODEL_INTERNALS = ("bert.embeddings", "bert.encoder.layer", "bert.pooler.dense", "bert.pooler.activation", "classifier")
LAYER_INTERNALS = (
    "attention.self.query",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.self.num_attention_heads",
    "attention.self.attention_head_size",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate",
    "output.dense",
    "output.LayerNorm",
)


def applies(model: Any) -> bool:
    """A BERT classifier: an encoder with absolute positions."""
    config = model.config
    return (
        type(model).__name__ == "BertForSequenceClassification"
        and not getattr(config, "is_decoder", False)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


def _feed_forward(block: Any, context: Any, residual: Any) -> Any:
    """The rest of a BERT layer after attention: output projection, residual, norm, feed-forward, norm."""
    x = block.attention.output.LayerNorm(block.attention.output.dense(context) + residual)
    return block.output.LayerNorm(block.output.dense(block.intermediate(x)) + x)


class ClsOnlyLastLayer(torch.nn.Module):
    def __init__(self, model: Any, label_index: int):
        super().__init__()
        self.bert = model.bert
        self.classifier = model.classifier
        self.label_index = label_index

    @staticmethod
    def layer(block: Any, hidden: Any, mask: Any, batch: Any) -> Any:
        """One BERT layer over 2-D ``hidden`` (sequences x positions, width): each linear layer is then one
        matrix product with its bias added in it."""
        attention = block.attention.self
        width = hidden.shape[-1]
        heads, size = attention.num_attention_heads, attention.attention_head_size

        def split(x: Any) -> Any:
            return x.view(batch, -1, heads, size).transpose(1, 2)

        q, k, v = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
        weights = (q @ k.transpose(-1, -2) * size**-0.5 + mask).softmax(-1)
        return _feed_forward(block, (weights @ v).transpose(1, 2).reshape(-1, width), hidden)

    @staticmethod
    def cls_layer(block: Any, hidden: Any, mask: Any, batch: Any) -> Any:
        """The last layer at the [CLS] position only, without forming its keys and values: a key enters only
        as q . (W_k h + b_k) = (W_k^T q) . h + q . b_k, whose last term is the same at every position and
        cancels in the softmax; a value only as sum a (W_v h + b_v) = W_v (sum a h) + b_v, the weights summing
        to 1. So the [CLS] query goes through the key weights and the weighted hidden states through the value
        weights, per head: two products of one row instead of two of every position."""
        attention = block.attention.self
        width = hidden.shape[-1]
        heads, size = attention.num_attention_heads, attention.attention_head_size
        states = hidden.view(batch, -1, width)
        cls = states[:, 0]
        query = attention.query(cls).view(batch, heads, 1, size)
        key_query = query @ attention.key.weight.view(heads, size, width)  # (batch, heads, 1, width)
        weights = (key_query @ states.transpose(1, 2)[:, None] * size**-0.5 + mask).softmax(-1)
        mixed = weights @ states[:, None]  # (batch, heads, 1, width): the weighted hidden states
        value_weight = attention.value.weight.view(heads, size, width).transpose(-1, -2)
        context = (mixed @ value_weight).reshape(batch, width) + attention.value.bias
        return _feed_forward(block, context, cls)

    def forward(self, input_ids, attention_mask):
        batch = input_ids.shape[0]
        hidden = self.bert.embeddings(input_ids=input_ids)
        width = hidden.shape[-1]
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        hidden = hidden.reshape(-1, width)
        *inner, last = self.bert.encoder.layer
        for block in inner:
            hidden = self.layer(block, hidden, mask, batch)
        cls = self.cls_layer(last, hidden, mask, batch)
        pooler = self.bert.pooler
        return self.classifier(pooler.activation(pooler.dense(cls)))[:, self.label_index]


def build(model: Any, label_index: int) -> torch.nn.Module:
    require(model, *MODEL_INTERNALS, graph=NAME)
    for block in model.bert.encoder.layer:
        require(block, *LAYER_INTERNALS, graph=NAME)
    return ClsOnlyLastLayer(model, label_index).eval()


GRAPH = Graph(NAME, applies, build)
