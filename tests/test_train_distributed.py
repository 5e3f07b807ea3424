"""``reward-train`` as two CPU processes (torchrun, gloo): one data-parallel run, one checkpoint written once, whose
manifest covers the whole data set, with and without LoRA; the LoRA run's merged model is served and scores.

(``accelerate launch --cpu --num_processes 2`` starts a single process: Accelerate runs several CPU processes only
through MPI. torchrun is what a PyTorchJob or an indexed Job starts on each node.)"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from tests.fixtures.commands import run_module, write_jsonl
from tests.fixtures.servers import ServerProcess
from training.checkpoint import load_checkpoint, read_manifest, score_all
from training.data import fingerprint, load_preference_rows, split_rows

pytestmark = pytest.mark.slow  # torchrun training runs

PAIRS = 64
EVAL_RATIO = 0.25
PROCESSES = 2
PER_DEVICE_BATCH = 4
SEED = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """64 demo preference pairs as jsonl."""
    from training.demo_data import generate_pairs

    return write_jsonl(tmp_path_factory.mktemp("dist-data") / "pairs.jsonl", generate_pairs(PAIRS, seed=2))


def launch_training(model_dir: Path, data: Path, output_dir: Path, *extra: str):
    """``torchrun --nproc_per_node 2 -m training.train ...`` (what a PyTorchJob or an indexed Job runs), with this
    checkout's code. No ``--use_cpu``: on machines without a GPU the processes must still form one group."""
    return run_module(
        "torch.distributed.run",
        "--nproc_per_node",
        str(PROCESSES),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "training.train",
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        data,
        "--output_dir",
        output_dir,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        str(PER_DEVICE_BATCH),
        "--per_device_eval_batch_size",
        "8",
        "--max_length",
        "128",
        "--eval_split_ratio",
        str(EVAL_RATIO),
        "--report_to",
        "none",
        "--log_level",
        "info",  # the trainer's run summary (examples, total batch size) from the main process
        "--seed",
        str(SEED),
        *extra,
        timeout=300,
    )


def raw_scores(checkpoint_dir: Path, texts: list[str]) -> list[float]:
    checkpoint = load_checkpoint(checkpoint_dir, device="cpu")
    return score_all(checkpoint, [checkpoint.formatter.encode({"text": t}).input_ids for t in texts])


def check_one_complete_checkpoint(result, output_dir: Path, data: Path) -> dict:
    """What a user relies on after a multi-process run: it succeeded, both processes trained on one batch
    (2 x 4 pairs a step), and exactly one checkpoint was written whose manifest covers every pair once."""
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # All processes leave the group together once training ends, before the main one writes (a process exiting while
    # the group is open elsewhere can abort in gloo's teardown; a barrier after a long evaluation would time out).
    wrote_at = log.index("INFO reward-train: wrote ")
    for rank in range(PROCESSES):
        assert 0 <= log.find(f"process {rank} of {PROCESSES}: training done, left the process group") < wrote_at
    total_batch = re.search(r"Total train batch size \(w\. parallel, distributed & accumulation\) = (\d+)", log)
    assert total_batch and int(total_batch.group(1)) == PROCESSES * PER_DEVICE_BATCH, log[-4000:]
    # Only the main process writes: one "wrote" line, one set of files, no per-rank folders or adapter files.
    assert len(re.findall(r"reward-train: wrote ", log)) == 1, log[-4000:]
    names = sorted(p.name for p in output_dir.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"], names
    assert not [n for n in names if n.startswith(("checkpoint-", "adapter_", "rank"))], names
    for name in ("reward_manifest.json", "config.json", "README.md"):
        assert name in names, names

    manifest = read_manifest(output_dir)
    n_train, n_eval = manifest["training"]["n_train"], manifest["eval"]["n"]
    assert n_train + n_eval == PAIRS, (n_train, n_eval)  # the whole data set, not one rank's shard
    assert manifest["normalization"]["n"] == 2 * n_train
    # Exactly the single-process split (no rank-dependent shuffle): the same rows, each counted once.
    train_rows, eval_rows = split_rows(load_preference_rows(str(data)), EVAL_RATIO, SEED)
    assert (n_train, n_eval) == (len(train_rows), len(eval_rows))
    assert manifest["training"]["data_fingerprint"] == fingerprint(train_rows)
    assert manifest["training"]["eval_data_fingerprint"] == fingerprint(eval_rows)
    assert manifest["training"]["arguments"]["training"]["max_steps"] == 3
    return manifest


def test_two_processes_write_one_checkpoint_covering_every_pair(tiny_bert_dir, pairs_file, tmp_path):
    output_dir = tmp_path / "rm"
    result = launch_training(tiny_bert_dir, pairs_file, output_dir)
    check_one_complete_checkpoint(result, output_dir, pairs_file)
    # The written weights are the trained ones, not the base model's.
    texts = ["a good answer is helpful polite and on topic", "a bad answer is rude"]
    assert raw_scores(output_dir, texts) != pytest.approx(raw_scores(tiny_bert_dir, texts), abs=1e-5)


def test_two_processes_with_lora_save_one_merged_model_that_serves(tiny_bert_dir, pairs_file, tmp_path):
    output_dir = tmp_path / "rm-lora"
    result = launch_training(
        tiny_bert_dir,
        pairs_file,
        output_dir,
        "--use_peft",
        "--lora_task_type",
        "SEQ_CLS",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "query",
        "value",
    )
    check_one_complete_checkpoint(result, output_dir, pairs_file)
    config = json.loads((output_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]  # a plain model, LoRA merged into it

    from safetensors import safe_open

    with safe_open(str(output_dir / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k], keys[:10]

    import httpx

    texts = ["a good answer is helpful polite and on topic", "a bad answer is rude wrong vague or off topic"]
    expected = raw_scores(output_dir, texts)
    server = ServerProcess(["--model", str(output_dir), "--torch-threads", "1"]).start()
    try:
        response = httpx.post(server.url + "/score", json={"items": [{"text": t} for t in texts]}, timeout=30)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    assert response.json()["scores"] == pytest.approx(expected, abs=1e-5)
