"""``reward-eval`` and :func:`training.evaluate.evaluate_pairs` on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures.commands import run_module, write_jsonl
from training import evaluate
from training.checkpoint import forward_scores, load_checkpoint
from training.demo_data import generate_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bert_checkpoint(tiny_bert_dir):
    return load_checkpoint(tiny_bert_dir)


def direct_score(checkpoint, item) -> float:
    """One item scored alone, outside reward-eval's batching."""
    return forward_scores(checkpoint, [checkpoint.formatter.encode(item).input_ids])[0]


@pytest.fixture(scope="module")
def known_pairs(bert_checkpoint):
    """8 pairs whose outcome is known from direct scores: 6 ordered correctly, 2 deliberately swapped."""
    texts = generate_pairs(20, seed=7)
    candidates = []
    for row in texts:
        a = direct_score(bert_checkpoint, {"prompt": row["prompt"], "response": row["chosen"]})
        b = direct_score(bert_checkpoint, {"prompt": row["prompt"], "response": row["rejected"]})
        if abs(a - b) > 1e-4:  # far above any batching noise
            hi, lo = (row["chosen"], row["rejected"]) if a > b else (row["rejected"], row["chosen"])
            candidates.append((row["prompt"], hi, lo, abs(a - b)))
    assert len(candidates) >= 8, "the random tiny model scores too many texts alike"
    rows, margins = [], []
    for i, (prompt, hi, lo, gap) in enumerate(candidates[:8]):
        if i in (2, 5):  # swapped: the model prefers the rejected side
            rows.append({"prompt": prompt, "chosen": lo, "rejected": hi})
            margins.append(-gap)
        else:
            rows.append({"prompt": prompt, "chosen": hi, "rejected": lo})
            margins.append(gap)
    return rows, sum(margins) / len(margins)


# -- metrics --------------------------------------------------------------------------------------------------------
def test_pair_metrics_counts_ties_as_half():
    m = evaluate.pair_metrics([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.5, 1.0])
    assert m == {"n": 4, "accuracy": pytest.approx((1 + 0.5 + 0 + 1) / 4), "mean_margin": pytest.approx(0.5)}
    assert evaluate.pair_metrics([0.0] * 3, [0.0] * 3)["accuracy"] == 0.5  # exact: a ratio of counts (1.5 / 3)
    with pytest.raises(evaluate.EvaluationError):
        evaluate.pair_metrics([], [])


def test_normalization_stats_are_population_mean_and_std():
    stats = evaluate.normalization_stats([1.0, 3.0, 5.0, 7.0])
    assert stats["mean"] == pytest.approx(4.0)
    assert stats["std"] == pytest.approx(5.0**0.5)


# -- evaluate_pairs -------------------------------------------------------------------------------------------------
def test_evaluate_pairs_on_known_outcomes(bert_checkpoint, known_pairs):
    rows, expected_margin = known_pairs
    result = evaluate.evaluate_pairs(bert_checkpoint, rows)
    assert result["n"] == 8
    assert result["accuracy"] == 0.75  # exact: 6 of 8 pairs, each gap far above the batching noise
    assert result["mean_margin"] == pytest.approx(expected_margin, abs=2e-4)  # two scores, batched vs alone
    assert result["truncated"] == 0
    for row, c, r in zip(rows, result["chosen_scores"], result["rejected_scores"], strict=True):
        assert c == pytest.approx(
            direct_score(bert_checkpoint, {"prompt": row["prompt"], "response": row["chosen"]}), abs=1e-4
        )
        assert r == pytest.approx(
            direct_score(bert_checkpoint, {"prompt": row["prompt"], "response": row["rejected"]}), abs=1e-4
        )
    both = result["chosen_scores"] + result["rejected_scores"]
    assert result["normalization"]["mean"] == pytest.approx(sum(both) / len(both))


def test_scores_do_not_depend_on_batching_for_a_padless_decoder(tiny_llama_dir):
    """The Llama tokenizer has no pad token (eos is the fallback): batch neighbours must not change a score."""
    checkpoint = load_checkpoint(tiny_llama_dir)
    assert checkpoint.formatter.recipe.architecture == "decoder"
    rows = generate_pairs(6, seed=3)
    one_by_one = evaluate.evaluate_pairs(checkpoint, rows, max_batch_tokens=1)
    batched = evaluate.evaluate_pairs(checkpoint, rows, max_batch_tokens=100_000)
    assert one_by_one["chosen_scores"] == pytest.approx(batched["chosen_scores"], abs=1e-4)
    assert one_by_one["rejected_scores"] == pytest.approx(batched["rejected_scores"], abs=1e-4)


def test_evaluate_pairs_counts_truncated_pairs(tiny_bert_dir):
    checkpoint = load_checkpoint(tiny_bert_dir, max_length=12)
    tok = checkpoint.formatter.tokenizer
    rows = [
        {"chosen": "one two", "rejected": "three"},  # fits
        {"chosen": " ".join(["one"] * 20), "rejected": "two"},  # chosen too long
        {"chosen": "two", "rejected": " ".join(["three"] * 11)},  # rejected is 13 tokens with [CLS]/[SEP]
        {"chosen": " ".join(["red"] * 10), "rejected": " ".join(["blue"] * 10)},  # both exactly 12: fit
    ]
    lengths = [(len(tok(r["chosen"])["input_ids"]), len(tok(r["rejected"])["input_ids"])) for r in rows]
    assert lengths == [(4, 3), (22, 3), (3, 13), (12, 12)]
    assert evaluate.evaluate_pairs(checkpoint, rows)["truncated"] == 2


def test_evaluate_pairs_names_the_bad_row(bert_checkpoint):
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "a"}]
    with pytest.raises(evaluate.FormattingError, match="row 1: missing column 'rejected'"):
        evaluate.evaluate_pairs(bert_checkpoint, rows)
    with pytest.raises(evaluate.EvaluationError):
        evaluate.evaluate_pairs(bert_checkpoint, [])


# -- the CLI --------------------------------------------------------------------------------------------------------
def test_reward_eval_report_and_printed_numbers(tmp_path, tiny_bert_dir, known_pairs, capsys):
    rows, expected_margin = known_pairs
    data = write_jsonl(tmp_path / "known.jsonl", rows)
    report_path = tmp_path / "out" / "report.json"
    code = evaluate.main(
        ["--checkpoint", str(tiny_bert_dir), "--dataset", str(data), "--output", str(report_path), "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "accuracy: 0.750000" in out
    assert "n: 8" in out
    assert "truncated: 0" in out
    printed = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert float(printed["mean_margin"]) == pytest.approx(expected_margin, abs=2e-4)  # batched vs alone
    report = json.loads(report_path.read_text())
    assert report["n"] == 8 and report["accuracy"] == 0.75 and report["truncated"] == 0  # 6 of 8: a count
    assert report["mean_margin"] == pytest.approx(expected_margin, abs=2e-4)
    assert len(report["scores"]["chosen"]) == len(report["scores"]["rejected"]) == 8
    assert set(report["normalization"]) == {"mean", "std"}


def test_reward_eval_plot_writes_a_png(tmp_path, tiny_bert_dir, tiny_pairs_file, capsys):
    plot = tmp_path / "rewards.png"
    code = evaluate.main(
        ["--checkpoint", str(tiny_bert_dir), "--dataset", str(tiny_pairs_file), "--plot", str(plot), "--device", "cpu"]
    )
    assert code == 0, capsys.readouterr().err
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert "n: 24" in capsys.readouterr().out


def test_reward_eval_reads_other_formats(tmp_path, tiny_bert_dir, known_pairs, capsys):
    rows, _ = known_pairs
    json_file = tmp_path / "pairs.json"
    json_file.write_text(json.dumps(rows))
    csv_file = tmp_path / "pairs.csv"
    import csv

    with csv_file.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    for path in (json_file, csv_file):
        assert evaluate.main(["--checkpoint", str(tiny_bert_dir), "--dataset", str(path), "--device", "cpu"]) == 0
        assert "accuracy: 0.750000" in capsys.readouterr().out


@pytest.fixture
def bad_inputs(tmp_path, tiny_bert_dir, tiny_pairs_file):
    missing_column = write_jsonl(tmp_path / "no_rejected.jsonl", [{"prompt": "q", "chosen": "a"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert_dir) / name, no_tokenizer / name)
    return {
        "missing_file": (["--checkpoint", tiny_bert_dir, "--dataset", tmp_path / "nope.jsonl"], "nope.jsonl"),
        "missing_column": (["--checkpoint", tiny_bert_dir, "--dataset", missing_column], "missing column 'rejected'"),
        "empty": (["--checkpoint", tiny_bert_dir, "--dataset", empty], "empty"),
        "broken_json": (["--checkpoint", tiny_bert_dir, "--dataset", broken], "broken.jsonl"),
        "no_tokenizer": (["--checkpoint", no_tokenizer, "--dataset", tiny_pairs_file], "tokenizer"),
        "no_checkpoint": (["--checkpoint", tmp_path / "absent", "--dataset", tiny_pairs_file], "absent"),
    }


@pytest.mark.parametrize(
    "case", ["missing_file", "missing_column", "empty", "broken_json", "no_tokenizer", "no_checkpoint"]
)
def test_reward_eval_bad_input_exits_2_with_one_line(bad_inputs, case, capsys):
    argv, needle = bad_inputs[case]
    code = evaluate.main([str(a) for a in argv] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("reward-eval: error:") and needle in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow  # reward-eval as a subprocess, twice
def test_reward_eval_subprocess_success_and_failure(tmp_path, tiny_bert_dir, tiny_pairs_file):
    """The real entry point: exit 0 with numbers on stdout, exit 2 with no traceback on a bad dataset."""
    report = tmp_path / "r.json"
    ok = run_module(
        "training.evaluate",
        "--checkpoint",
        tiny_bert_dir,
        "--dataset",
        tiny_pairs_file,
        "--output",
        report,
        "--device",
        "cpu",
    )
    assert ok.returncode == 0, ok.stderr
    assert "accuracy:" in ok.stdout and json.loads(report.read_text())["n"] == 24
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "a", "rejected": 3}])
    failed = run_module("training.evaluate", "--checkpoint", tiny_bert_dir, "--dataset", bad, "--device", "cpu")
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert "'rejected' must be a string" in failed.stderr
