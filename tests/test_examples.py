"""The examples in examples/: the TRL GRPO one runs (smallest form) against a real server; the others name what
exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from service import verl
from tests.fixtures.commands import REPO, repo_env
from tests.fixtures.servers import ServerProcess, metric_value

pytestmark = pytest.mark.slow  # a GRPO run against a reward-serve subprocess

EXAMPLES = REPO / "examples"


def score_requests(server: ServerProcess) -> float:
    return metric_value(
        httpx.get(server.url + "/metrics", timeout=10).text, "reward_requests_total", {"route": "/score"}
    )


def test_trl_grpo_example_trains_a_tiny_policy_against_the_service(live_server: ServerProcess, tmp_path: Path):
    """Two GRPO steps of a tiny random policy built in-process (no downloads); every reward comes from the
    server (at least one /score request per step)."""
    before = score_requests(live_server)
    env = repo_env(OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(EXAMPLES / "trl_grpo.py"),
        "--reward-url",
        live_server.url,
        "--steps",
        "2",
        "--num-generations",
        "2",
        "--max-completion-length",
        "8",
        "--output-dir",
        str(tmp_path / "grpo"),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trained 2 steps" in result.stdout
    assert score_requests(live_server) - before >= 2


def test_verl_config_names_functions_that_exist():
    config = yaml.safe_load((EXAMPLES / "verl" / "reward_service.yaml").read_text())
    assert callable(getattr(verl, config["custom_reward_function"]["name"]))
    assert set(config["custom_reward_function"]["reward_kwargs"]) <= set(verl.Settings._fields) | {"reward_service_url"}
    script = (EXAMPLES / "verl" / "run_grpo.sh").read_text()
    for name in ("compute_score", "compute_score_async", "compute_score_batch"):
        assert callable(getattr(verl, name))
    assert "custom_reward_function.name=compute_score_batch" in script


@pytest.mark.parametrize("script", ["openrlhf.sh", "slime.sh", "verl/run_grpo.sh"])
def test_shell_examples_parse(script: str):
    result = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
