"""The throughput benchmark's smoke run (``python -m bench --smoke``): every scenario for about a second on a tiny
random model, so the harness cannot rot. It checks the report's shape, not any speed (CI machines vary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.commands import REPO, repo_env
from tests.fixtures.models import HH_RLHF_FILE

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# The real hh-rlhf texts when this machine has them (their length spread is what batching meets), else the demo pairs.
SMOKE_DATA = ["--data", str(HH_RLHF_FILE)] if HH_RLHF_FILE.is_file() else []
SCENARIOS = ("ceiling", "service_64x1", "service_4x64", "service_open", "naive_64x1", "naive_4x64", "naive_open")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-smoke")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(out), *SMOKE_DATA],
        cwd=REPO,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"python -m bench --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.slow  # python -m bench --smoke: every scenario, servers as subprocesses
def test_every_scenario_has_positive_throughput_and_no_errors(smoke_report):
    report, _ = smoke_report
    scenarios = report["runs"]["float32"]["scenarios"]
    assert set(scenarios) == set(SCENARIOS)
    for name, result in scenarios.items():
        assert result["texts_per_s"] > 0, name
        assert result["tokens_per_s"] > 0, name
        if name != "ceiling":
            assert result["requests"] > 0, name
            assert result["failed_requests"] == 0 and not result["errors"], (name, result["errors"])
            assert result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["p99"], name
            assert result["mean_items_per_forward"] >= 1, name  # read from the server's /metrics
            assert 0 < result["padding_efficiency"] <= 1, name
            assert result["forward_busy"] is not None and result["forward_padded_tokens_per_s"] > 0, name


@pytest.mark.slow  # python -m bench --smoke: every scenario, servers as subprocesses
def test_ratios_batching_and_outputs(smoke_report):
    report, out = smoke_report
    run = report["runs"]["float32"]
    for key in (
        "service_64x1_vs_ceiling",
        "service_4x64_vs_ceiling",
        "service_open_vs_ceiling",
        "service_64x1_vs_naive",
        "service_4x64_vs_naive",
        "naive_4x64_vs_ceiling",
    ):
        assert run["ratios"][key] > 0, key
    ceiling = run["scenarios"]["ceiling"]
    # The ceiling is timed again after every load scenario; each scenario is compared with the timings around it.
    timings = [t["texts_per_s"] for t in ceiling["timings"]]
    # exact: the report copies these numbers, it does not recompute them
    assert timings[0] == ceiling["sweep"][ceiling["best"]]["texts_per_s"] and len(timings) == len(SCENARIOS)
    assert ceiling["texts_per_s"] == pytest.approx(sum(timings) / len(timings))
    loads = [name for name in run["scenarios"] if name != "ceiling"]  # in the order they ran
    for i, name in enumerate(loads):
        around = run["scenarios"][name]["ceiling_around"]
        assert (around["before"], around["after"]) == (timings[i], timings[i + 1]), name  # copied: exact
        assert run["ratios"][f"{name}_vs_ceiling"] == pytest.approx(
            run["scenarios"][name]["texts_per_s"] / ((timings[i] + timings[i + 1]) / 2)
        ), name
    assert all(v["passes"] >= 1 and v["texts_per_cpu_s"] > 0 for v in ceiling["sweep"].values())
    assert {"one_at_a_time", "unsorted_16"} <= set(ceiling["sweep"])
    # The ceiling is the service's own forward (--backend auto: ONNX Runtime on a float32 CPU model, [CLS]-only graph
    # for the tiny BERT), not a slower one that would flatter the service.
    assert ceiling["forward"]["backend"] == "onnx" and ceiling["forward"]["onnx_graph"] == "bert-cls"
    check = ceiling["scores_vs_torch"]  # and it scores every text of the pool as the trained model does
    assert check["texts"] == report["texts"]["n"] and 0 <= check["max_abs_diff"] <= 1e-5
    # The naive server never batches across requests: one-text requests make one-item forwards.
    assert run["scenarios"]["naive_64x1"]["mean_items_per_forward"] == 1  # exact: items / forwards, two counts
    assert {t["target"] for t in report["targets"]} >= {"service_64x1_vs_ceiling", "service_4x64_vs_naive"}
    assert report["texts"]["n"] > 0 and report["machine"]["cpus"] >= 1
    from service.hardware import describe_cpu

    cpu = describe_cpu()  # every result names the CPU it came from: model and instruction set
    assert report["machine"]["cpu"] == cpu and report["machine"]["isa"] == cpu["isa"]
    table = (out / "bench.md").read_text()
    assert f"- Machine: {cpu['model']} ({cpu['architecture']}, {cpu['isa']}" in table
    for name in SCENARIOS:
        assert f"| {name} |" in table
    png = out / "bench.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the naive server as a subprocess
def test_naive_server_pads_each_request_to_its_longest(tmp_path):
    """The peer is what it claims to be: each request is one forward over its own texts, unsorted."""
    from fastapi.testclient import TestClient

    from bench.naive_server import create_app
    from bench.tiny import make_tiny_checkpoint
    from training.checkpoint import forward_scores, load_checkpoint

    checkpoint = load_checkpoint(make_tiny_checkpoint(tmp_path / "tiny"))
    texts = ["a short one", "a much longer text with many more words in it than the first", "mid length text"]
    with TestClient(create_app(checkpoint)) as client:
        scores = client.post("/score", json={"items": [{"text": t} for t in texts]}).json()["scores"]
        rewards = client.post("/get_reward", json={"query": texts}).json()["rewards"]
        metrics = client.get("/metrics").text
    ids = [checkpoint.formatter.encode({"text": t}).input_ids for t in texts]
    assert scores == pytest.approx(forward_scores(checkpoint, ids), abs=1e-5)
    assert rewards == pytest.approx(scores, abs=1e-5)
    assert "reward_batch_size_count 2" in metrics and "reward_batch_size_sum 6" in metrics
    assert f"reward_batch_tokens_sum {2 * 3 * max(map(len, ids))}" in metrics


# -- the vLLM comparison (its server is not installed in CI: only what the benchmark sends and computes) ----------
def test_vllm_requests_carry_the_service_texts_with_its_truncation():
    from bench.load import build_payloads

    items = [{"text": "a b"}, {"prompt": "Q: ", "response": "yes"}, {"text": "c"}]
    payloads = build_payloads(items, [3, 4, 2], 2, api="vllm", max_length=256)
    assert [json.loads(p.body) for p in payloads] == [
        {"model": "rm", "input": ["a b", "Q: yes"], "use_activation": False, "truncate_prompt_tokens": 256},
        {"model": "rm", "input": ["c", "a b"], "use_activation": False, "truncate_prompt_tokens": 256},
    ]
    assert [(p.texts, p.tokens) for p in payloads] == [(2, 7), (2, 5)]


def test_vllm_reserves_room_for_a_larger_models_weights_and_kv_cache(tmp_path):
    import psutil

    from bench.servers import vllm_memory_share

    small, large = tmp_path / "small", tmp_path / "large"
    for folder, size in ((small, 90 << 20), (large, psutil.virtual_memory().total // 4)):
        folder.mkdir()
        with (folder / "model.safetensors").open("wb") as f:  # sparse: the size is what counts
            f.truncate(size)
    assert vllm_memory_share(small) == 0.15  # the share every encoder figure was measured with
    share = vllm_memory_share(large)
    assert 0.15 < share <= 0.9  # a fixed 0.15 left a 0.5B-parameter float32 model no room for its KV cache


def test_each_interleaved_service_run_is_compared_with_the_vllm_run_beside_it():
    from bench.compare import ratios
    from bench.report import peer_table

    scenarios = {
        name: {"texts_per_s": tput, "description": name}
        for name, tput in [("service_64x1", 60.0), ("vllm_64x1", 50.0), ("service_64x1#2", 66.0), ("vllm_64x1#2", 44.0)]
    }
    out = ratios(scenarios)
    assert out["service_64x1_vs_vllm_each"] == pytest.approx([1.2, 1.5])
    assert out["service_64x1_vs_vllm"] == pytest.approx(1.35)  # the median of the pairs
    assert "service_4x64_vs_vllm" not in out
    table = "\n".join(peer_table({"scenarios": scenarios}))
    assert "| 64x1 | 60.0 | 50.0 | 1.20 |" in table and "| 64x1#2 | 66.0 | 44.0 | 1.50 |" in table


def test_vllm_scenarios_need_the_peer_venv(tmp_path, capsys):
    from bench.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "service_64x1,vllm_64x1", "--peer-python", str(tmp_path / "missing" / "python")])
    assert "make bench-peers" in capsys.readouterr().err
    assert "vllm_64x1" not in parse_args([]).scenario_list  # never part of the default run


def test_data_is_a_local_file_or_a_hub_data_set_part(tiny_pairs_file, monkeypatch):
    """``--data``: a local jsonl is read as it is; anything else is a hub id loaded through ``datasets`` with the
    data_dir and split given (hh-rlhf's harmless-base test split by default)."""
    import datasets

    from bench.run import parse_args
    from bench.texts import held_out_pairs, load_pool, load_rows

    rows, source = load_rows(tiny_pairs_file)
    assert len(rows) == 24 and source == str(tiny_pairs_file)
    pool = load_pool(10, rows, source)
    assert len(pool.items) == 10 and all({"prompt", "response"} <= set(item) for item in pool.items)
    held_out, _ = held_out_pairs(5, tiny_pairs_file, rows)
    assert len(held_out) == 5 and all(row in rows for row in held_out)

    asked = []

    def load_dataset(path, name=None, data_dir=None, split=None):
        asked.append((path, name, data_dir, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = parse_args([])
    assert (args.data, args.data_dir, args.split) == ("Anthropic/hh-rlhf", "harmless-base", "test")
    hub_rows, source = load_rows(args.data, data_dir=args.data_dir, split=args.split)
    assert asked == [("Anthropic/hh-rlhf", None, "harmless-base", "test")] and hub_rows == rows
    assert source == "Anthropic/hh-rlhf (harmless-base, test)"
    assert parse_args(["--smoke"]).data == "demo"  # the smoke run stays offline unless given --data


@pytest.mark.slow
def test_telemetry_cost_under_load_times_both_services_in_turn(tmp_path, capsys):
    from bench import telemetry_cost
    from bench.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    argv = ["--repeats", "2", "--checkpoint", str(checkpoint), "--duration-s", "0.5", "--clients", "4"]
    assert telemetry_cost.main([*argv, "--data", "demo"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("repeat")]
    assert [line.split(":")[0] for line in lines] == [
        f"repeat {r}, telemetry {side}" for r in (1, 2) for side in ("on ", "off")
    ]
    assert all(line.endswith(", 0 failed") and " 0.00 texts/s" not in line for line in lines)
    assert "on / off per pair: " in out
