"""``reward-eval`` on RewardBench 2 and RM-Bench rows: per-subset accuracy, intervals, and parity with the service.

The fixture files have the real data sets' columns (``allenai/reward-bench-2``: prompt, chosen list, rejected list,
subset, ...; ``THU-KEG/RM-Bench``: prompt, three chosen and three rejected answers, domain) and answers arranged from
the tiny model's own scores, so every row's outcome is known before reward-eval runs.
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.commands import write_jsonl
from tests.fixtures.servers import ServerProcess
from training import benchmarks, evaluate
from training.checkpoint import forward_scores, load_checkpoint

PROMPT = "how do i keep my plants alive ?"
ANSWERS = [
    "water them once a week .",
    "put them near a window .",
    "i do not know .",
    "plants are green .",
    "give them some light and water .",
    "ask someone else .",
    "use good soil and check the leaves .",
    "never water them .",
    "keep them in a dark box .",
    "talk to them every day .",
    "move them outside in winter .",
    "trim dead leaves and water weekly .",
]


@pytest.fixture(scope="module")
def ranked(tiny_reward_checkpoint):
    """The answers ordered by the tiny model's score (lowest first), each alone; neighbours at least 1e-3 apart."""
    checkpoint = load_checkpoint(tiny_reward_checkpoint)
    scored = []
    for answer in ANSWERS:
        ids = checkpoint.formatter.encode({"prompt": PROMPT, "response": answer}).input_ids
        scored.append((forward_scores(checkpoint, [ids])[0], answer))
    scored.sort()
    gaps = [b[0] - a[0] for a, b in zip(scored, scored[1:], strict=False)]
    spaced = [scored[0]] + [s for s, gap in zip(scored[1:], gaps, strict=True) if gap > 1e-3]
    assert len(spaced) >= 6, "the random tiny model scores too many answers alike"
    return [answer for _, answer in spaced]


def rewardbench2_rows(ranked):
    """Focus: 2 of 3 rows right (1-of-4 rows); Ties: 1 of 2 right (2 chosen of 5)."""
    top, second, low = ranked[-1], ranked[-2], ranked[:3]

    def row(i, subset, chosen, rejected):
        return {
            "id": str(i),
            "prompt": PROMPT,
            "chosen": chosen,
            "rejected": rejected,
            "num_correct": len(chosen),
            "num_incorrect": len(rejected),
            "total_completions": len(chosen) + len(rejected),
            "models": ["m"] * (len(chosen) + len(rejected)),
            "subset": subset,
            "additional_metadata": {"category": subset.lower()},
        }

    return [
        row(0, "Focus", [top], low),  # right: the best answer is chosen
        row(1, "Focus", [second], [ranked[0], ranked[1], ranked[2]]),  # right
        row(2, "Focus", [ranked[0]], [top, second, ranked[1]]),  # wrong: chosen is the lowest
        row(3, "Ties", [top, second], low),  # right: both chosen above every rejected
        row(4, "Ties", [top, ranked[0]], [second, ranked[1], ranked[2]]),  # wrong: one chosen is the lowest
    ]


def rmbench_rows(ranked):
    """chat: a style-biased row (right only when the chosen answer is at least as styled: hard 0, normal 1, easy 1)
    and an all-right row; safety-refuse: an all-wrong row."""
    s = ranked[:6]

    def row(i, domain, chosen, rejected):
        return {"id": i, "prompt": PROMPT, "chosen": chosen, "rejected": rejected, "domain": domain}

    return [
        row(0, "chat", [s[1], s[3], s[5]], [s[0], s[2], s[4]]),
        row(1, "chat", [s[5], s[4], s[3]], [s[0], s[1], s[2]]),
        row(2, "safety-refuse", [s[0], s[1], s[2]], [s[3], s[4], s[5]]),
    ]


# -- the per-row rules -------------------------------------------------------------------------------------------
def test_style_matrix_splits_into_hard_normal_easy():
    matrix = benchmarks.style_matrix([2.0, 4.0, 6.0], [1.0, 3.0, 5.0])
    assert matrix == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    acc = benchmarks.style_accuracies(matrix)
    assert acc == {"hard": 0.0, "normal": 1.0, "easy": 1.0, "average": pytest.approx(6 / 9)}


def test_best_of_n_is_strict_and_random_is_one_over_n_choose_k():
    assert benchmarks.best_of_n_correct([2.0], [1.0, 1.5, 0.0])
    assert not benchmarks.best_of_n_correct([2.0], [1.0, 2.0, 0.0])  # a tie with a rejected answer is wrong
    assert not benchmarks.best_of_n_correct([3.0, 0.5], [1.0, 0.0])
    assert benchmarks.random_best_of_n(1, 3) == 0.25
    assert benchmarks.random_best_of_n(2, 3) == 0.1


def test_intervals_cover_the_estimate_and_shrink_with_more_rows():
    low, high = benchmarks.wilson_interval(7, 10)
    assert 0.0 < low < 0.7 < high < 1.0
    wide = high - low
    low, high = benchmarks.wilson_interval(70, 100)
    assert low < 0.7 < high and high - low < wide
    low, high = benchmarks.bootstrap_interval([0.0, 1 / 3, 2 / 3, 1.0] * 5)
    assert low < 0.5 < high


def test_formats_are_detected_from_the_columns(ranked):
    assert benchmarks.detect_format(rewardbench2_rows(ranked)) == "rewardbench2"
    assert benchmarks.detect_format(rmbench_rows(ranked)) == "rm-bench"
    assert benchmarks.detect_format([{"chosen": "a", "rejected": "b"}]) == "pairs"
    conversation = [{"role": "assistant", "content": "a"}]
    assert benchmarks.detect_format([{"chosen": conversation, "rejected": conversation}]) == "pairs"
    with pytest.raises(benchmarks.BenchmarkError, match="name the format with --format"):
        benchmarks.detect_format([{"chosen": ["a"], "rejected": ["b"]}])


def test_malformed_benchmark_rows_are_named(tmp_path, tiny_reward_checkpoint, ranked, capsys):
    rows = rmbench_rows(ranked)
    rows[1]["chosen"] = rows[1]["chosen"][:2]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = evaluate.main(["--checkpoint", str(tiny_reward_checkpoint), "--dataset", str(data), "--device", "cpu"])
    assert code == 2
    assert "row 1: RM-Bench rows have 3 'chosen' answers" in capsys.readouterr().err


# -- through the checkpoint ----------------------------------------------------------------------------------------
def test_rewardbench2_rows_through_the_checkpoint(tmp_path, tiny_reward_checkpoint, ranked, capsys):
    data = write_jsonl(tmp_path / "rb2.jsonl", rewardbench2_rows(ranked))
    out = tmp_path / "rb2.json"
    argv = ["--checkpoint", str(tiny_reward_checkpoint), "--dataset", str(data), "--output", str(out)]
    assert evaluate.main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["format"] == "rewardbench2" and report["scored_by"] == "checkpoint"
    focus, ties = report["groups"]["Focus"], report["groups"]["Ties"]
    assert (focus["n"], focus["accuracy"], focus["random"]) == (3, pytest.approx(2 / 3), 0.25)
    assert (ties["n"], ties["accuracy"], ties["random"]) == (2, 0.5, pytest.approx(0.1))
    assert focus["ci95"][0] < 2 / 3 < focus["ci95"][1]
    assert report["overall"]["accuracy"] == pytest.approx(3 / 5)
    assert report["overall"]["mean_of_subsets"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert [r["correct"] for r in report["rows"]] == [True, True, False, True, False]
    assert "Focus" in printed and "mean of subsets: 0.5833" in printed


def test_rmbench_rows_through_the_checkpoint(tmp_path, tiny_reward_checkpoint, ranked, capsys):
    data = write_jsonl(tmp_path / "rmb.jsonl", rmbench_rows(ranked))
    out = tmp_path / "rmb.json"
    argv = ["--checkpoint", str(tiny_reward_checkpoint), "--dataset", str(data), "--output", str(out)]
    assert evaluate.main([*argv, "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    chat, refuse = report["groups"]["chat"], report["groups"]["safety-refuse"]
    assert (chat["hard"], chat["normal"], chat["easy"]) == (0.5, 1.0, 1.0)
    assert chat["average"] == pytest.approx((6 / 9 + 1) / 2)
    assert (refuse["hard"], refuse["normal"], refuse["easy"], refuse["average"]) == (0.0, 0.0, 0.0, 0.0)
    assert refuse["ci95"] == [0.0, 0.0]  # one row, all cells agree
    assert report["overall"]["hard"] == pytest.approx(1 / 3)
    assert chat["hard_ci95"][0] <= 0.5 <= chat["hard_ci95"][1]
    assert "hard" in capsys.readouterr().out


# -- through a live service ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_reward_checkpoint):
    process = ServerProcess(["--model", str(tiny_reward_checkpoint), "--torch-threads", "1"]).start(ready_timeout=180)
    yield process
    process.stop()


@pytest.mark.slow  # reward-serve as a subprocess
@pytest.mark.parametrize("rows_of", [rewardbench2_rows, rmbench_rows], ids=["rewardbench2", "rm-bench"])
def test_benchmarks_through_the_service_match_the_checkpoint(
    tmp_path, tiny_reward_checkpoint, ranked, server, rows_of, capsys
):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_of(ranked))
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    base = ["--dataset", str(data), "--device", "cpu"]
    assert evaluate.main([*base, "--checkpoint", str(tiny_reward_checkpoint), "--output", str(local)]) == 0
    argv = [*base, "--url", server.url, "--checkpoint", str(tiny_reward_checkpoint), "--output", str(remote)]
    assert evaluate.main(argv) == 0
    assert "parity" in capsys.readouterr().out
    by_checkpoint, by_service = json.loads(local.read_text()), json.loads(remote.read_text())
    assert by_service["scored_by"] == "service"
    for name, group in by_service["groups"].items():
        assert group["parity_max_abs_diff"] <= 1e-5, name
        assert group["accuracy"] == by_checkpoint["groups"][name]["accuracy"]
    assert by_service["overall"]["parity_max_abs_diff"] <= 1e-5
    assert by_service["rows"] == [
        {**row, "chosen": pytest.approx(row["chosen"], abs=1e-5), "rejected": pytest.approx(row["rejected"], abs=1e-5)}
        for row in by_checkpoint["rows"]
    ]


@pytest.mark.slow  # reward-serve as a subprocess
def test_pairs_through_the_service_alone(tmp_path, ranked, server, capsys):
    rows = [{"prompt": PROMPT, "chosen": ranked[-1], "rejected": ranked[0]}] * 3
    rows.append({"prompt": PROMPT, "chosen": ranked[0], "rejected": ranked[-1]})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "pairs.json"
    assert evaluate.main(["--url", server.url, "--dataset", str(data), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "pairs" and report["overall"]["accuracy"] == 0.75
    assert "parity_max_abs_diff" not in report["overall"]  # nothing in-process to compare with


def test_an_unreachable_service_is_one_line_exit_2(tmp_path, ranked, capsys):
    data = write_jsonl(tmp_path / "rb2.jsonl", rewardbench2_rows(ranked))
    assert evaluate.main(["--url", "http://127.0.0.1:9", "--dataset", str(data)]) == 2
    assert "cannot reach the service" in capsys.readouterr().err
