"""What every graph builder shares: the :class:`Graph` entry of the registry, and the loud lookup of the model
internals a hand-written graph depends on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class GraphMismatch(RuntimeError):
    """The model lacks an internal that the graph is written against (e.g. transformers renamed a module)."""


@dataclass(frozen=True)
class Graph:
    """One way to export a reward model: ``build(model, label_index)`` is a module computing
    ``(input_ids, attention_mask) -> the reward logit``, for the models where ``applies(model)``."""

    name: str
    applies: Callable[[Any], bool]
    build: Callable[[Any, int], Any]


def require(root: Any, *paths: str, graph: str) -> None:
    """Fail with :class:`GraphMismatch` naming the first of ``paths`` (dotted attributes of ``root``) that is
    missing, so that a renamed transformers internal stops the graph here, by name, rather than deep in an export."""
    for path in paths:
        node = root
        for part in path.split("."):
            if not hasattr(node, part):
                raise GraphMismatch(
                    f"the {graph} graph needs {type(root).__name__}.{path}, and {type(node).__name__} has no "
                    f"{part!r} (renamed in this transformers version?)"
                )
            node = getattr(node, part)
