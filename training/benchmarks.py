"""Benchmark-format evaluation: RewardBench 2's best-of-N rows and RM-Bench's style matrix, per subset.

A benchmark row holds one prompt and several candidate answers; the reward model scores each (prompt, answer) as
an item of the formatting contract, and the row's outcome follows from its scores:

- **RewardBench 2** (``allenai/reward-bench-2``): ``prompt``, ``chosen`` (a list, one answer except in the Ties
  subset), ``rejected`` (a list, usually three), ``subset``. A row is correct when every chosen answer scores strictly
  higher than every rejected one; a random scorer gets 1 / C(N, k) (N answers, k of them chosen), 1/4 for the usual
  1-of-4 row. The leaderboard's Ties score also weighs margins between correct answers; that part is not computed
  here, so the Ties line is its accuracy term only.
- **RM-Bench** (``THU-KEG/RM-Bench``): ``prompt``, ``chosen`` and ``rejected`` (three answers each, in the order
  concise, detailed plain text, detailed markdown), ``domain``. Each row fills a 3x3 matrix of ``chosen[i] >
  rejected[j]`` (strict); *hard* is the mean of the cells above the diagonal (a plainer chosen answer against a more
  styled rejected one), *normal* the diagonal, *easy* the cells below; *average* is the mean of all nine cells. A
  random scorer gets 0.5 on each.
- **pairs** (the preference rows ``reward-eval`` always read): one chosen and one rejected answer, a tie counting
  half.

Every group (subset, domain, or "all") gets a 95 % confidence interval: Wilson's for an accuracy over rows that are
each right or wrong (scipy's ``binomtest``), a percentile bootstrap over rows otherwise (RM-Bench's per-row
fractions, pairs with ties; scipy's ``bootstrap``, fixed seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PAIRS, REWARDBENCH2, RMBENCH = "pairs", "rewardbench2", "rm-bench"
FORMATS = (PAIRS, REWARDBENCH2, RMBENCH)
RMBENCH_STYLES = ("concise", "detailed", "detailed_markdown")
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


class BenchmarkError(ValueError):
    """Rows that do not fit the benchmark format they were read as."""


# A scorer maps items (the formatting contract's dicts) to (scores, truncated flags), in item order.
Scorer = Callable[[Sequence[Mapping[str, Any]]], tuple[list[float], list[bool]]]


def detect_format(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rewardbench2`` for list-valued ``chosen`` with a ``subset``, ``rm-bench`` for list-valued ``chosen`` with a
    ``domain``, else ``pairs`` (a message list of dicts is a conversation, not a list of answers)."""
    first = rows[0]
    answers = first.get("chosen")
    if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
        if "subset" in first:
            return REWARDBENCH2
        if "domain" in first:
            return RMBENCH
        raise BenchmarkError(
            "'chosen' holds a list of answers but the rows have neither 'subset' (RewardBench 2) nor 'domain' "
            "(RM-Bench); name the format with --format"
        )
    return PAIRS


@dataclass(frozen=True)
class Candidates:
    """The items to score, and for each row which of them are its chosen and rejected answers, and its group."""

    items: list[dict[str, Any]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    groups: list[str]


def candidates(rows: Sequence[Mapping[str, Any]], fmt: str, *, as_messages: bool = False) -> Candidates:
    """Every (prompt, answer) of every row as an item: ``{"prompt", "response"}`` (TRL's explicit-prompt
    concatenation, as training saw pairs) or, with ``as_messages``, a user/assistant conversation for the model's
    chat template."""
    if fmt not in FORMATS:
        raise BenchmarkError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    items: list[dict[str, Any]] = []
    chosen: list[list[int]] = []
    rejected: list[list[int]] = []
    groups: list[str] = []
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise BenchmarkError(f"row {index}: 'prompt' must be a string, got {type(prompt).__name__}")
        sides = []
        for side in ("chosen", "rejected"):
            answers = _answers(row, side, fmt, index)
            sides.append(list(range(len(items), len(items) + len(answers))))
            items += [_item(prompt, answer, as_messages) for answer in answers]
        chosen.append(sides[0])
        rejected.append(sides[1])
        groups.append(_group(row, fmt, index))
    return Candidates(items, chosen, rejected, groups)


def _answers(row: Mapping[str, Any], side: str, fmt: str, index: int) -> list[str]:
    value = row.get(side)
    if fmt == PAIRS:
        if not isinstance(value, str):
            raise BenchmarkError(f"row {index}: '{side}' must be a string, got {type(value).__name__}")
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise BenchmarkError(f"row {index}: '{side}' must be a non-empty list of strings")
    if fmt == RMBENCH and len(value) != len(RMBENCH_STYLES):
        raise BenchmarkError(
            f"row {index}: RM-Bench rows have {len(RMBENCH_STYLES)} '{side}' answers ({', '.join(RMBENCH_STYLES)}), "
            f"got {len(value)}"
        )
    return value


def _group(row: Mapping[str, Any], fmt: str, index: int) -> str:
    if fmt == PAIRS:
        return str(row.get("subset") or "all")
    key = "subset" if fmt == REWARDBENCH2 else "domain"
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise BenchmarkError(f"row {index}: no '{key}'")
    return value


def _item(prompt: str | None, answer: str, as_messages: bool) -> dict[str, Any]:
    if as_messages:
        turns = [{"role": "user", "content": prompt}] if prompt is not None else []
        return {"messages": [*turns, {"role": "assistant", "content": answer}]}
    return {"text": answer} if prompt is None else {"prompt": prompt, "response": answer}


# -- per-row outcomes ----------------------------------------------------------------------------------------------
def best_of_n_correct(chosen: Sequence[float], rejected: Sequence[float]) -> bool:
    """Every chosen answer strictly above every rejected one."""
    return min(chosen) > max(rejected)


def random_best_of_n(n_chosen: int, n_rejected: int) -> float:
    """The chance that a random order puts all chosen answers on top: 1 / C(N, k)."""
    return 1.0 / math.comb(n_chosen + n_rejected, n_chosen)


def style_matrix(chosen: Sequence[float], rejected: Sequence[float]) -> list[list[float]]:
    """RM-Bench's matrix for one row: cell (i, j) is 1 when chosen style i beats rejected style j."""
    return [[1.0 if c > r else 0.0 for r in rejected] for c in chosen]


def style_accuracies(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """hard (above the diagonal), normal (the diagonal), easy (below) and average (all cells) of a 3x3 matrix."""
    size = len(matrix)
    upper = [matrix[i][j] for i in range(size) for j in range(size) if i < j]
    lower = [matrix[i][j] for i in range(size) for j in range(size) if i > j]
    diagonal = [matrix[i][i] for i in range(size)]
    cells = [v for row in matrix for v in row]
    return {
        "hard": sum(upper) / len(upper),
        "normal": sum(diagonal) / len(diagonal),
        "easy": sum(lower) / len(lower),
        "average": sum(cells) / len(cells),
    }


def pair_outcome(chosen: float, rejected: float) -> float:
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


# -- confidence intervals --------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of the mean over rows; a group whose rows all agree gets a zero-width interval."""
    if len(set(values)) == 1:
        return float(values[0]), float(values[0])
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _summary(values: Sequence[float], binary: bool) -> dict[str, Any]:
    n = len(values)
    mean = math.fsum(values) / n
    low, high = wilson_interval(round(mean * n), n) if binary else bootstrap_interval(values)
    return {"accuracy": mean, "ci95": [low, high]}


# -- reports -------------------------------------------------------------------------------------------------------
def report(
    cands: Candidates,
    fmt: str,
    scores: Sequence[float],
    *,
    truncated: Sequence[bool] | None = None,
    reference: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Per group and overall: rows, accuracy with its 95 % interval, the random baseline, truncated items, and
    (with ``reference``, the same items scored another way) the largest |difference| between the two scorings."""
    rows_by_group: dict[str, list[int]] = {}
    for row, group in enumerate(cands.groups):
        rows_by_group.setdefault(group, []).append(row)
    per_row = [
        _row_outcome(fmt, [scores[i] for i in c], [scores[i] for i in r])
        for c, r in zip(cands.chosen, cands.rejected, strict=True)
    ]
    groups = {
        name: _group_report(fmt, cands, rows, per_row, truncated, scores, reference)
        for name, rows in sorted(rows_by_group.items())
    }
    overall = _group_report(fmt, cands, range(len(per_row)), per_row, truncated, scores, reference)
    if fmt == REWARDBENCH2:
        # The leaderboard's figure: the mean of the subsets' accuracies (each subset weighs the same).
        overall["mean_of_subsets"] = math.fsum(g["accuracy"] for g in groups.values()) / len(groups)
    return {"format": fmt, "groups": groups, "overall": overall, "rows": per_row}


def _row_outcome(fmt: str, chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    if fmt == RMBENCH:
        return {"chosen": chosen, "rejected": rejected, **style_accuracies(style_matrix(chosen, rejected))}
    if fmt == REWARDBENCH2:
        return {"chosen": chosen, "rejected": rejected, "correct": best_of_n_correct(chosen, rejected)}
    return {"chosen": chosen, "rejected": rejected, "correct": pair_outcome(chosen[0], rejected[0])}


def _group_report(fmt, cands, rows, per_row, truncated, scores, reference) -> dict[str, Any]:
    rows = list(rows)
    items = [i for row in rows for i in cands.chosen[row] + cands.rejected[row]]
    out: dict[str, Any] = {"n": len(rows), "items": len(items)}
    if fmt == RMBENCH:
        for key in ("hard", "normal", "easy", "average"):
            summary = _summary([per_row[row][key] for row in rows], binary=False)
            out[key], out[f"{key}_ci95"] = summary["accuracy"], summary["ci95"]
        out["accuracy"], out["ci95"] = out["average"], out["average_ci95"]
        out["random"] = 0.5
    else:
        outcomes = [float(per_row[row]["correct"]) for row in rows]
        binary = all(v in (0.0, 1.0) for v in outcomes)
        out.update(_summary(outcomes, binary))
        out["random"] = math.fsum(
            random_best_of_n(len(cands.chosen[row]), len(cands.rejected[row])) if fmt == REWARDBENCH2 else 0.5
            for row in rows
        ) / len(rows)
    if truncated is not None:
        out["truncated"] = sum(bool(truncated[i]) for i in items)
    if reference is not None:
        out["parity_max_abs_diff"] = max(abs(scores[i] - reference[i]) for i in items)
    return out


def table(result: Mapping[str, Any]) -> list[str]:
    """The report as aligned text lines, one per group and one for all rows."""
    fmt = result["format"]
    extra = ("hard", "normal", "easy") if fmt == RMBENCH else ()
    parity = "parity_max_abs_diff" in result["overall"]
    head = ["group", "n", "accuracy", "95% CI", "random", *extra, *(["parity"] if parity else [])]
    lines = []
    groups = result["groups"]
    entries = [*(groups.items() if list(groups) != ["all"] else []), ("all", result["overall"])]
    for name, g in entries:
        cells = [
            name,
            str(g["n"]),
            f"{g['accuracy']:.4f}",
            f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]",
            f"{g['random']:.4f}",
            *(f"{g[k]:.4f}" for k in extra),
            *([f"{g['parity_max_abs_diff']:.2e}"] if parity else []),
        ]
        lines.append(cells)
    widths = [max(len(head[c]), *(len(line[c]) for line in lines)) for c in range(len(head))]
    render = ["  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)) for cells in [head, *lines]]
    if fmt == REWARDBENCH2:
        render.append(f"mean of subsets: {result['overall']['mean_of_subsets']:.4f}")
    return render


# -- scorers -------------------------------------------------------------------------------------------------------
def checkpoint_scorer(checkpoint: Any, *, max_batch_tokens: int, progress=None) -> Scorer:
    """Items through the checkpoint's formatter and an in-process forward."""
    from training.checkpoint import score_all
    from training.formatting import FormattingError

    def score(items: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[bool]]:
        encoded = []
        for index, item in enumerate(items):
            try:
                encoded.append(checkpoint.formatter.encode(item))
            except FormattingError as exc:
                raise FormattingError(f"item {index}: {exc}") from exc
        ids = [e.input_ids for e in encoded]
        return score_all(checkpoint, ids, max_batch_tokens=max_batch_tokens, progress=progress), [
            e.truncated for e in encoded
        ]

    return score


def service_scorer(url: str, *, api_key: str | None = None, chunk: int = 256, timeout_s: float = 300.0) -> Scorer:
    """Items through a running reward service's ``POST /score``, ``chunk`` items per request (raw scores)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def score(items: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[bool]]:
        scores: list[float] = []
        truncated: list[bool] = []
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
            for start in range(0, len(items), chunk):
                try:
                    response = client.post("/score", json={"items": list(items[start : start + chunk])})
                except httpx.HTTPError as exc:
                    raise BenchmarkError(f"{url}: cannot reach the service ({exc.__class__.__name__}: {exc})") from exc
                if response.status_code != 200:
                    raise BenchmarkError(f"{url}/score answered {response.status_code}: {response.text[:500]}")
                body = response.json()
                scores += body["scores"]
                truncated += body["truncated"]
        return scores, truncated

    return score
