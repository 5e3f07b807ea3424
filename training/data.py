"""Preference data in: local files, folders, hub ids or the embedded demo set, as plain rows.

A row is ``{"chosen": ..., "rejected": ...}`` with an optional ``prompt`` and ``margin``; ``chosen``/``rejected``
are strings (hh-rlhf transcripts work as they come) or message lists.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO = "demo"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
REQUIRED_COLUMNS = ("chosen", "rejected")


class DataError(ValueError):
    """Preference data that cannot be used: unreadable, empty, or missing a column."""


def load_preference_rows(
    name: str, *, split: str = "train", config: str | None = None, data_dir: str | None = None
) -> list[dict[str, Any]]:
    """Read preference rows from ``demo``, a local file or folder, or a hub data set id (``config`` and
    ``data_dir`` select a part of it, as in ``datasets.load_dataset``)."""
    if name == DEMO:
        from training.demo_data import generate_pairs

        return generate_pairs()
    path = Path(name)
    if path.exists():
        rows = _load_local(path)
        source = str(path)
    elif path.suffix.lower() in LOCAL_FORMATS or name.startswith((".", "/", "~")):
        raise DataError(f"{name}: no such file or folder")
    else:
        rows = _load_hub(name, split=split, config=config, data_dir=data_dir)
        source = f"{name} [{data_dir + ', ' if data_dir else ''}{split}]"
    if not rows:
        raise DataError(f"{source}: the data set is empty")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(
            f"{source}: missing column {missing[0]!r} (found {sorted(rows[0])}); each row needs 'chosen' and 'rejected'"
        )
    for i, row in enumerate(rows):
        for column in REQUIRED_COLUMNS:
            if row.get(column) is None:
                raise DataError(f"{source}: row {i} has no value in column {column!r}")
    return rows


def _load_local(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
        if not files:
            raise DataError(f"{path}: the folder holds no .jsonl/.json/.parquet/.csv files")
        return [row for file in files for row in _load_local(file)]
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    from datasets import load_dataset

    try:
        return load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train").to_list()
    except Exception as exc:  # datasets raises many types for a broken file
        raise DataError(f"{path}: cannot read it as {suffix[1:]} ({exc.__class__.__name__}: {exc})") from exc


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc.__class__.__name__})") from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        elif path.suffix.lower() == ".json" and stripped.startswith("{") and "\n{" not in stripped:
            data = json.loads(text)
            rows = data.get("data", data.get("rows")) if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a list of rows (or {{'data': [...]}})")
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be a JSON object")
    return rows


def _load_hub(name: str, *, split: str, config: str | None, data_dir: str | None) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return load_dataset(name, name=config, data_dir=data_dir, split=split).to_list()
    except Exception as exc:
        raise DataError(f"{name}: cannot load it from the hub ({exc.__class__.__name__}: {exc})") from exc


def split_rows(rows: Sequence[dict[str, Any]], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Carve a held-out set of ``ratio`` of the rows (shuffled with ``seed``); both parts keep at least one row."""
    if not 0 < ratio < 1:
        raise DataError(f"eval_split_ratio must be between 0 and 1, got {ratio}")
    if len(rows) < 2:
        raise DataError("the data set needs at least 2 rows to carve out an eval split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(rows) * ratio)), len(rows) - 1)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """A stable sha256 of the rows, recorded in the manifest so a checkpoint names the data it saw."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
