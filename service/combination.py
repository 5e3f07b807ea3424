"""The declared combination of several reward models: ``--combine "0.7*helpful + 0.3*harmless"``.

An expression is linear in the components' scores: numbers, component names, ``+ - * /``, unary minus and
parentheses, parsed with :mod:`ast` (never evaluated) into one weight per component and a constant. A name that is
not a Python identifier (``rm-v2``, ``2b``) is written as a string: ``0.5*"rm-v2" + 0.5*helpful``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

COMPONENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
ScoresMode = Literal["raw", "normalized"]


class CombinationError(ValueError):
    """The expression is not a linear combination of the served components."""


@dataclass(frozen=True)
class Combination:
    """``constant + sum(weights[name] * score(name))``; ``scores`` says whether each score is the component's raw
    score or its score normalized with its manifest's training statistics."""

    expression: str
    weights: dict[str, float]  # every component, 0.0 for one the expression does not name
    constant: float = 0.0
    scores: ScoresMode = "raw"

    def apply(self, scores: Mapping[str, float]) -> float:
        return self.constant + sum(w * scores[name] for name, w in self.weights.items() if w)

    def describe(self) -> dict[str, object]:
        return {
            "expression": self.expression,
            "weights": self.weights,
            "constant": self.constant,
            "scores": self.scores,
        }


def plain_sum(names: Sequence[str], scores: ScoresMode = "raw") -> Combination:
    """Every component with weight 1 (TRL's default for several reward functions: their sum)."""
    return Combination(" + ".join(_written(n) for n in names), dict.fromkeys(names, 1.0), 0.0, scores)


def parse_combination(expression: str, names: Sequence[str], scores: ScoresMode = "raw") -> Combination:
    """The weights and constant of ``expression`` over the components ``names``; :class:`CombinationError` naming
    the problem for anything that is not a linear combination of them."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CombinationError(f"--combine {expression!r} is not a valid expression: {exc.msg}") from None
    weights, constant = _linear(tree.body, frozenset(names), expression)
    if not any(weights.values()):
        raise CombinationError(f"--combine {expression!r} gives no component a weight")
    return Combination(expression, {n: float(weights.get(n, 0.0)) for n in names}, float(constant), scores)


def combined_version(versions: Mapping[str, str], combination: Combination) -> str:
    """A short id that changes when a component's model, a name, a weight, the constant or the score mode does."""
    data = {"components": dict(versions), **combination.describe()}
    data.pop("expression")  # the same weights written differently are the same reward
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _written(name: str) -> str:
    return name if name.isidentifier() else json.dumps(name)


Linear = tuple[dict[str, float], float]


def _linear(node: ast.expr, names: frozenset[str], expression: str) -> Linear:
    """``node`` as (weights, constant), refusing anything that is not linear in the components."""

    def fail(why: str) -> CombinationError:
        return CombinationError(f"--combine {expression!r}: {why}")

    if isinstance(node, ast.Constant) and isinstance(node.value, str) or isinstance(node, ast.Name):
        name = node.value if isinstance(node, ast.Constant) else node.id
        if name not in names:
            served = ", ".join(sorted(names))
            raise fail(f"unknown component {name!r} (the components are: {served})")
        return {name: 1.0}, 0.0
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return {}, float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        weights, constant = _linear(node.operand, names, expression)
        return {k: sign * v for k, v in weights.items()}, sign * constant
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _linear(node.left, names, expression), _linear(node.right, names, expression)
        return _binary(node.op, left, right, fail)
    raise fail(f"{ast.unparse(node)!r} is not allowed: only numbers, component names, + - * / and parentheses")


def _binary(op: ast.operator, left: Linear, right: Linear, fail) -> Linear:
    (lw, lc), (rw, rc) = left, right
    if isinstance(op, ast.Add | ast.Sub):
        sign = 1.0 if isinstance(op, ast.Add) else -1.0
        weights = dict(lw)
        for name, w in rw.items():
            weights[name] = weights.get(name, 0.0) + sign * w
        return weights, lc + sign * rc
    if isinstance(op, ast.Mult):
        if lw and rw:
            raise fail("a product of two components is not a linear combination")
        factor, (weights, constant) = (rc, left) if not rw else (lc, right)
        return {k: factor * v for k, v in weights.items()}, factor * constant
    if rw:
        raise fail("dividing by a component is not a linear combination")
    if rc == 0:
        raise fail("division by zero")
    return {k: v / rc for k, v in lw.items()}, lc / rc
