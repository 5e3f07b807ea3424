"""Graph builders by architecture: which ONNX graphs apply to a model, fastest first, and the module each exports.

Every graph computes ``(input_ids, attention_mask) -> the reward logit``. ``full`` is the model's own forward and
applies to every model; a *fast* graph computes the same scores with less arithmetic for one family of
architectures, in a module of its own (``bert``: a BERT classifier's last layer at [CLS] only). Adding one is that
module, defining a :class:`~service.graphs.base.Graph`, and its entry in :data:`FAST_GRAPHS`.

Decoders get a graph of another contract (:mod:`service.graphs.decoder`: past keys and values in and out, for
computing shared prompt prefixes once), loaded by the backend before this registry is consulted.
"""

from __future__ import annotations

from typing import Any

from service.graphs import bert
from service.graphs.base import Graph, GraphMismatch

__all__ = ["FAST_GRAPHS", "FULL", "Graph", "GraphMismatch", "build", "fast_graph_for", "graphs_for"]


def _full(model: Any, label_index: int) -> Any:
    """The model's own forward, its reward logit picked out."""
    import torch

    class RewardLogit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, label_index]

    return RewardLogit().eval()


FULL = Graph("full", lambda model: True, _full)

# The fast graphs, tried in this order before the full one; the first that applies is the one a model should get.
FAST_GRAPHS: tuple[Graph, ...] = (bert.GRAPH,)


def graphs_for(model: Any) -> list[str]:
    """The graphs to try for ``model``, fastest first: the fast graphs that apply, then ``full``."""
    return [graph.name for graph in FAST_GRAPHS if graph.applies(model)] + [FULL.name]


def fast_graph_for(model: Any) -> str | None:
    """The fast graph ``model``'s architecture should be served with, or None when it has none."""
    return next((graph.name for graph in FAST_GRAPHS if graph.applies(model)), None)


def build(model: Any, label_index: int, name: str) -> Any:
    """The module exported as graph ``name`` for ``model``. Raises :class:`GraphMismatch` when ``name`` does not
    apply to it, or when the model lacks an internal the graph is written against."""
    for graph in (*FAST_GRAPHS, FULL):
        if graph.name == name:
            if not graph.applies(model):
                raise GraphMismatch(f"no {name} graph for {type(model).__name__}")
            return graph.build(model, label_index)
    raise GraphMismatch(f"no graph named {name!r}")
