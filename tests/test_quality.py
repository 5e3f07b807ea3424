"""The quality benchmark's side-by-side mode (``python -m bench.quality --compare``), on a tiny random BERT and a
dozen pairs for one step each: it checks the plumbing (folds, both recipes, scoring with the tokenization each was
trained with, the table, resuming), not any accuracy."""

from __future__ import annotations

import json

import pytest

from bench.quality import fold_split
from tests.fixtures.commands import run_module, write_jsonl

pytestmark = pytest.mark.slow  # training runs of both recipes

pytest.importorskip("trl")

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)  # past the tests' max_length: dropped by TRL


@pytest.fixture(scope="module")
def plain_pairs(tmp_path_factory, tiny_pairs):
    """Twelve hh-rlhf-shaped rows (whole texts, no prompt column), the first one too long for TRL's filter."""
    rows = [
        {"chosen": p["prompt"] + " " + p["chosen"], "rejected": p["prompt"] + " " + p["rejected"]} for p in tiny_pairs
    ]
    rows = rows[:12]
    rows[0] = {"chosen": LONG + " yes", "rejected": LONG + " no"}
    return write_jsonl(tmp_path_factory.mktemp("quality") / "pairs.jsonl", rows)


def test_folds_hold_out_every_row_once():
    rows = [str(i) for i in range(10)]
    held = [fold_split(rows, 3, k)[1] for k in range(3)]
    assert sorted(sum(held, [])) == rows
    assert [len(h) for h in held] == [3, 3, 4]
    for k in range(3):
        train, held_out = fold_split(rows, 3, k)
        assert sorted(train + held_out) == rows and not set(train) & set(held_out)
    assert fold_split(rows, 3, 1) == fold_split(rows, 3, 1)  # deterministic: both recipes see the same fold
    with pytest.raises(ValueError):
        fold_split(rows, 3, 3)


def test_trl_stock_checkpoint_is_scored_with_its_own_tokenization(tmp_path, tiny_bert_dir, plain_pairs):
    from transformers import AutoTokenizer

    from bench.trl_stock import pair_ids_like_trl, parse, train_stock
    from training.checkpoint import load_checkpoint

    out = tmp_path / "stock"
    args, config = parse(["--train", str(plain_pairs), "--output", str(out), "--max_steps", "1", "--max_length", "64"])
    assert (config.bf16, config.gradient_checkpointing) == (False, False)  # the CPU fixes
    assert (config.learning_rate, config.per_device_train_batch_size) == (1e-4, 8)  # the rest is TRL's
    training = train_stock(args.train, out, str(tiny_bert_dir), config)
    assert (training["n_rows"], training["n_train"], training["dropped_long"]) == (12, 11, 1)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    formatter = load_checkpoint(out).formatter
    rows = [json.loads(line) for line in plain_pairs.read_text().splitlines()]
    for row in rows[1:]:  # the pairs TRL trained on: scored with exactly those ids
        chosen, rejected = formatter.encode_pair(row)
        assert (chosen.input_ids, rejected.input_ids) == pair_ids_like_trl(tokenizer, row)
        assert chosen.input_ids.count(tokenizer.sep_token_id) == 1  # no eos text: one [SEP], not two
    chosen, _ = formatter.encode_pair(rows[0])  # longer than it trained on: cut on the left, the reply kept
    assert chosen.truncated and len(chosen.input_ids) == 64
    assert chosen.input_ids[-2] == tokenizer.convert_tokens_to_ids("yes")


def test_compare_runs_both_recipes_on_the_same_fold_and_resumes(tmp_path, tiny_bert_dir, plain_pairs):
    out = tmp_path / "study"
    common = ["--compare", "--data", plain_pairs, "--output", out, "--model", tiny_bert_dir, "--folds", "2"]
    flags = ["--default-flags", "--max_steps 1 --max_length 32", "--trl-flags", "--max_steps 1 --max_length 64"]
    result = run_module("bench.quality", *common, "--seeds", "0,1", "--max-runs", "2", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"default-fold0-seed0", "trl-stock-fold0-seed0"}  # both recipes of a cell, in that order
    default, stock = runs["default-fold0-seed0"], runs["trl-stock-fold0-seed0"]
    for run in (default, stock):
        assert (run["held_out_pairs"], run["train_rows"]) == (6, 6)
        assert 0 <= run["held_out_accuracy"] <= 1 and run["wall_seconds"] > 0 and run["cpu_seconds"] > 0
    assert default["train_pairs"] == 6  # ours truncates, never drops
    held_out = fold_split([str(i) for i in range(12)], 2, 0)[1]
    assert stock["train_pairs"] == (6 if "0" in held_out else 5)  # TRL drops the long pair when it trains on it
    assert default["scored_max_length"] == 32 and stock["scored_max_length"] == 64
    assert not any((out / "work").iterdir())  # each run's folder (checkpoint included) is deleted when done

    (out / "work" / "default-fold1-seed0").mkdir(parents=True)  # claimed by another process
    again = run_module("bench.quality", *common, "--seeds", "0", "--recipes", "default", *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "default-fold1-seed0: skipped, running elsewhere" in again.stdout
    assert len(list((out / "runs").glob("*.json"))) == 2  # nothing rerun, nothing run twice
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert {k: v["runs"] for k, v in summary["recipes"].items()} == {"default": 1, "trl-stock": 1}
    assert summary["paired_difference"]["mean"] == pytest.approx(
        stock["held_out_accuracy"] - default["held_out_accuracy"], abs=1e-12
    )
    table = (out / "compare.md").read_text()
    assert "| default | 1 |" in table and "| trl-stock | 1 |" in table
