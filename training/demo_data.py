"""Embedded demo preference data: a seeded generator of short ``prompt`` / ``chosen`` / ``rejected`` pairs.

All text here was written for this project; it lives in ``demo_data.json`` beside this module (package data).
Every pair asks an everyday question; ``chosen`` is an on-topic, helpful, polite answer built from correct tips for
that topic, and ``rejected`` is one of several kinds of bad answer:

- ``wrong``: polite and on-topic in tone but built from incorrect advice;
- ``rude``: insulting or dismissive, with at most one useful tip;
- ``refusal``: declines a harmless question for no reason;
- ``off_topic``: a perfectly good answer to a *different* question;
- ``vague``: non-committal filler that says nothing;
- ``lazy``: tells the user to look it up themselves.

Openers, closers, question phrasings, tip selection and order are all drawn at random, so the same strings rarely
repeat and a model has to pick up the qualities rather than memorize answers. :func:`generate_split` holds out whole
topics for evaluation, so held-out accuracy measures generalization to questions never seen in training.

Texts are short (a prompt plus an answer stays well under 80 word-piece tokens) so the demo trains in minutes on a
laptop CPU.

    python -m training.demo_data demo.jsonl [--n 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

BAD_KINDS = ("wrong", "rude", "refusal", "off_topic", "vague", "lazy")
DATA_FILE = "demo_data.json"  # the topics and phrases, beside this module


def _load() -> dict[str, Any]:
    # Package data (pyproject.toml's package-data), so an installed wheel carries it as a checkout does.
    with resources.files("training").joinpath(DATA_FILE).open(encoding="utf-8") as f:
        return json.load(f)


_DATA = _load()
# Each topic: its name (used in refusals and rude remarks), question phrasings, correct tips ("good"), incorrect
# tips ("wrong").
TOPICS: list[dict[str, Any]] = _DATA["topics"]
# The phrases answers are composed from; ``{name}`` stands for the topic's name.
_PHRASES: dict[str, list[str]] = _DATA["phrases"]
OPENERS = _PHRASES["openers"]
CLOSERS = _PHRASES["closers"]
WRONG_OPENERS = _PHRASES["wrong_openers"]
PROMPT_PREFIXES = _PHRASES["prompt_prefixes"]
RUDE_OPENERS = _PHRASES["rude_openers"]
RUDE_CLOSERS = _PHRASES["rude_closers"]
REFUSALS = _PHRASES["refusals"]
VAGUE = _PHRASES["vague"]
LAZY = _PHRASES["lazy"]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _good_answer(rng: random.Random, topic: dict[str, Any]) -> str:
    tips = rng.sample(topic["good"], rng.choice((2, 2, 3)))
    return _join(rng.choice(OPENERS), *tips, rng.choice(CLOSERS))


def _bad_answer(rng: random.Random, kind: str, topic: dict[str, Any], pool: Sequence[dict[str, Any]]) -> str:
    name = topic["name"]
    if kind == "wrong":
        tips = rng.sample(topic["wrong"], rng.choice((2, 2, 3)))
        return _join(rng.choice(WRONG_OPENERS), *tips, rng.choice(CLOSERS))
    if kind == "rude":
        tip = rng.choice(topic["good"]) if rng.random() < 0.5 else ""
        return _join(rng.choice(RUDE_OPENERS), tip, rng.choice(RUDE_CLOSERS))
    if kind == "refusal":
        return rng.choice(REFUSALS).format(name=name)
    if kind == "off_topic":
        others = [t for t in pool if t["name"] != name] or [t for t in TOPICS if t["name"] != name]
        return _good_answer(rng, rng.choice(others))
    if kind == "vague":
        lines = rng.sample(VAGUE, 2)
        return _join(*(line.format(name=name) for line in lines), rng.choice(("", "Good luck.")))
    if kind == "lazy":
        return _join(rng.choice(("", "Hmm.", "Meh.")), rng.choice(LAZY).format(name=name))
    raise ValueError(f"unknown bad-answer kind {kind!r}; use one of {BAD_KINDS}")


def _prompt(rng: random.Random, topic: dict[str, Any]) -> str:
    return rng.choice(PROMPT_PREFIXES) + rng.choice(topic["questions"]) + "\n"


def generate_pairs(
    n: int = 600,
    seed: int = 0,
    *,
    topics: Sequence[str] | None = None,
    with_metadata: bool = False,
) -> list[dict[str, Any]]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``, the same for the same ``n`` and ``seed``.

    ``topics`` restricts the questions (and off-topic answers) to those topic names. ``with_metadata`` adds
    ``topic`` and ``kind`` (the kind of bad answer) to each row; leave it off for training files.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    pool = [t for t in TOPICS if topics is None or t["name"] in set(topics)]
    if not pool:
        raise ValueError(f"no known topics among {list(topics or [])}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)  # every topic at least once
        kind = BAD_KINDS[rng.randrange(len(BAD_KINDS))]
        row: dict[str, Any] = {
            "prompt": _prompt(rng, topic),
            "chosen": _good_answer(rng, topic),
            "rejected": _bad_answer(rng, kind, topic, pool),
        }
        if with_metadata:
            row.update(topic=topic["name"], kind=kind)
        rows.append(row)
    rng.shuffle(rows)
    return rows


def split_topics(eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Topic names split into (train, held-out) at random; the held-out part has at least one topic."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    names = [t["name"] for t in TOPICS]
    random.Random(seed).shuffle(names)
    k = max(1, round(len(names) * eval_fraction))
    return sorted(names[k:]), sorted(names[:k])


def generate_split(
    n: int = 600, seed: int = 0, eval_fraction: float = 0.2, *, with_metadata: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) pairs whose topics do not overlap: ``round(n * eval_fraction)`` eval pairs on held-out topics."""
    train_topics, eval_topics = split_topics(eval_fraction, seed)
    n_eval = max(1, round(n * eval_fraction))
    train = generate_pairs(n - n_eval, seed, topics=train_topics, with_metadata=with_metadata)
    held_out = generate_pairs(n_eval, seed + 1, topics=eval_topics, with_metadata=with_metadata)
    return train, held_out


def to_conversational(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same pairs in TRL's conversational shape: a user message as prompt, assistant messages as answers."""
    out = []
    for row in rows:
        converted = dict(row)
        converted["prompt"] = [{"role": "user", "content": row["prompt"].strip()}]
        converted["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        converted["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
        out.append(converted)
    return out


def all_texts() -> list[str]:
    """Every fixed string the generator composes from (for building test vocabularies)."""
    texts: list[str] = []
    for topic in TOPICS:
        texts += [topic["name"], *topic["questions"], *topic["good"], *topic["wrong"]]
    for group in _PHRASES.values():
        texts += [t.replace("{name}", "") for t in group]
    return texts


def write_jsonl(path: str | Path, n: int = 600, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in generate_pairs(n, seed):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="the .jsonl file to write")
    parser.add_argument("--n", type=int, default=600, help="number of pairs (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    path = write_jsonl(args.output, args.n, args.seed)
    print(f"wrote {args.n} pairs to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
