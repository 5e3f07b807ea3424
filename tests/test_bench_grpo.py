"""``python -m bench.grpo`` on a tiny random decoder against the service alone, so the GRPO benchmark cannot rot:
every pattern answers without failures, and the service's counters show the shared prompts computed once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.grpo import rotated
from tests.fixtures.commands import REPO, repo_env

pytest.importorskip("fastapi")


@pytest.mark.slow  # a server as a subprocess, three load patterns
def test_grpo_benchmark_runs_every_pattern_and_shares_prompts(tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "bench.grpo", "--data", "demo", "--shape", "tiny", "--servers", "service"]
    argv += ["--groups", "8", "--repeats", "1", "--warmup-s", "0.5", "--duration-s", "2", "--output", str(out)]
    argv += ["--checkpoint", str(tmp_path / "model"), "--fresh-prompts"]
    result = subprocess.run(argv, cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "grpo.json").read_text())
    assert [r["pattern"] for r in report["runs"]] == ["group", "text", "4x64"]
    for run in report["runs"]:
        assert run["texts_per_s"] > 0 and run["failed_requests"] == 0, run
        counters = run["counters"]
        assert counters["reward_tokens_computed_total"] < counters["reward_tokens_scored_total"], counters
    assert "service ÷ vLLM" in (out / "grpo.md").read_text()


def test_fresh_prompt_windows_start_at_prompts_no_earlier_window_sent():
    groups = [[f"prompt {g} reply {k}" for k in range(8)] for g in range(12)]
    starts = [rotated(groups, window, 3)[0] for window in range(3)]
    assert starts == [groups[0], groups[4], groups[8]]
    assert all(sorted(rotated(groups, w, 3)) == sorted(groups) for w in range(3))  # every text still sent
