"""Shared fixtures: tiny random models (bench.tiny, built in-process, no network), a small preference file, a
checkpoint trained for two steps with ``reward-train``, and (from service_fixtures.py) the service tests' checkpoints,
servers and backends. Every fixture here is available to every test module without an import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Everything runs offline and quietly; subprocesses inherit this.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
}.items():
    os.environ.setdefault(_key, _value)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # `import service_fixtures` from any test module
    sys.path.insert(0, str(TESTS_DIR))
if str(REPO_ROOT) not in sys.path:  # `import bench`, `import service`, ... wherever pytest is started from
    sys.path.insert(0, str(REPO_ROOT))

from service_fixtures import (  # noqa: E402, F401  (imported to register these fixtures for every module)
    backend,
    controlled,
    live_server,
    plain_classifier_dir,
    service_checkpoint,
    tiny_reward_checkpoint,
)

from bench import tiny  # noqa: E402  (after the path set-up above)

TINY_PAIRS = 24


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def run_module(
    module: str, *args: str, timeout: float = 240, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a subprocess from the repository root; output captured as text. On timeout
    the whole process group is killed (a launcher such as torchrun leaves its workers running otherwise)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", module, *map(str, args)]
    pipe = subprocess.PIPE
    with subprocess.Popen(
        argv, cwd=str(cwd or REPO_ROOT), env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def reward_train_argv(model_dir: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    """The fast two-step ``reward-train`` command line the tests use."""
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--max_length",
        "32",
        "--report_to",
        "none",
        "--eval_split_ratio",
        "0.25",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT reward model (WordPiece tokenizer, [PAD]=0) saved as a plain HF folder."""
    return tiny.make_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama reward model (byte-level BPE, no pad token, a chat template) saved as a HF folder."""
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_pairs() -> list[dict]:
    from training.demo_data import generate_pairs

    return generate_pairs(TINY_PAIRS, seed=1)


@pytest.fixture(scope="session")
def tiny_pairs_file(tmp_path_factory, tiny_pairs) -> Path:
    """24 demo preference pairs (prompt/chosen/rejected) as jsonl."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", tiny_pairs)


@pytest.fixture(scope="session")
def trained_bert_checkpoint(tmp_path_factory, tiny_bert_dir, tiny_pairs_file) -> Path:
    """A reward checkpoint (weights, tokenizer, reward_manifest.json) from a 2-step ``reward-train`` run."""
    output_dir = tmp_path_factory.mktemp("trained-bert") / "checkpoint"
    result = run_module("training.train", *reward_train_argv(tiny_bert_dir, tiny_pairs_file, output_dir))
    if result.returncode != 0:
        pytest.fail(f"reward-train failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
    return output_dir
