"""The HTTP API in-process (TestClient over the ASGI app): shapes, agreement between routes, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.backend import plan_threads
from tests.fixtures.models import NORMALIZATION
from tests.fixtures.servers import app_client, make_settings

PROMPT = "what is two plus two? "
GOOD = "four, thanks for the question"
BAD = "five i think"


@pytest.fixture(scope="module")
def client(tiny_reward_checkpoint: Path):
    with app_client(make_settings(tiny_reward_checkpoint, max_wait_ms=1, max_text_chars=2000)) as c:
        assert c.get("/readyz").status_code == 200
        yield c


@pytest.fixture(scope="module")
def direct(tiny_reward_checkpoint: Path):
    """The checkpoint loaded directly, as reward-eval would."""
    from training.checkpoint import load_checkpoint

    return load_checkpoint(tiny_reward_checkpoint, device="cpu")


def direct_scores(checkpoint, items) -> list[float]:
    from training.checkpoint import forward_scores

    return [forward_scores(checkpoint, [checkpoint.formatter.encode(item).input_ids])[0] for item in items]


def score(client, items, **extra):
    response = client.post("/score", json={"items": items, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_score_takes_all_three_shapes(client):
    body = score(
        client,
        [
            {"text": PROMPT + GOOD},
            {"prompt": PROMPT, "response": GOOD},
            {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}]},
        ],
    )
    assert len(body["scores"]) == 3 and all(isinstance(s, float) for s in body["scores"])
    assert body["truncated"] == [False, False, False]
    assert body["model"] == "tiny-bert-reward" and len(body["model_version"]) == 12
    assert body["normalized"] is False


def test_text_and_prompt_plus_response_give_the_same_score(client):
    a, b = score(client, [{"text": PROMPT + GOOD}, {"prompt": PROMPT, "response": GOOD}])["scores"]
    assert a == pytest.approx(b, abs=1e-5)  # same tokens, different batch rows: request-shape tolerance


def test_served_scores_equal_the_checkpoint_loaded_directly(client, direct):
    items = [
        {"text": "hello world"},
        {"prompt": PROMPT, "response": BAD},
        {"messages": [{"role": "system", "content": "be helpful"}, {"role": "user", "content": "hello"}]},
        {"text": "the cat is blue " * 30},  # truncated to max_length
    ]
    body = score(client, items)
    assert body["scores"] == pytest.approx(direct_scores(direct, items), abs=1e-4)  # batched vs alone: neighbours
    assert body["truncated"] == [False, False, False, True]


def test_normalize_uses_the_manifest_statistics(client):
    items = [{"text": "hello world"}, {"text": "sorry, bad answer"}]
    raw = score(client, items)["scores"]
    normalized = score(client, items, normalize=True)
    assert normalized["normalized"] is True
    expected = [(s - NORMALIZATION["mean"]) / NORMALIZATION["std"] for s in raw]
    assert normalized["scores"] == pytest.approx(expected, abs=1e-5 / NORMALIZATION["std"])


def test_compare_agrees_with_score(client):
    pairs = [
        {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD},
        {"chosen": "a helpful answer", "rejected": "a harmful answer"},
        {
            "prompt": [{"role": "user", "content": PROMPT}],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}],
        },
    ]
    response = client.post("/compare", json={"pairs": pairs})
    assert response.status_code == 200, response.text
    body = response.json()
    items = [
        {"prompt": PROMPT, "response": GOOD},
        {"prompt": PROMPT, "response": BAD},
        {"text": "a helpful answer"},
        {"text": "a harmful answer"},
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}]},
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": BAD}]},
    ]
    s = score(client, items)["scores"]
    margins = [s[0] - s[1], s[2] - s[3], s[4] - s[5]]
    assert body["margins"] == pytest.approx(margins, abs=2e-5)  # two scores, each within 1e-5
    assert body["chosen_scores"] == pytest.approx(s[0::2], abs=1e-5)
    assert body["probabilities"] == pytest.approx([1 / (1 + math.exp(-m)) for m in margins], abs=1e-5)


def test_get_reward_speaks_openrlhf_and_agrees_with_score(client):
    queries = [PROMPT + GOOD, PROMPT + BAD]
    response = client.post(
        "/get_reward", json={"query": queries, "prompts": [PROMPT, PROMPT], "labels": ["", ""], "extra": 1}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = score(client, [{"text": q} for q in queries])["scores"]
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    assert body["scores"] == body["rewards"]  # one list, sent under both names
    assert body["extra_logs"] == {"truncated": [0.0, 0.0]}


def test_probes_info_metrics_and_docs(client):
    import torch

    from service.hardware import describe_cpu

    assert client.get("/healthz").json()["status"] == "alive"
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/info").json()
    assert info["model"] == "tiny-bert-reward" and info["has_manifest"] is True
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["formatting"]["architecture"] == "encoder" and info["formatting"]["max_length"] == 64
    assert info["normalization"] == NORMALIZATION  # the manifest's numbers, read back, not computed
    assert info["cpu"] == describe_cpu() and info["cpu"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu"]["model"] and info["cpu"]["usable_cpus"] >= 1
    assert info["batching"]["max_batch_tokens"] == 1024 and info["batching"]["max_wait_ms"] == 1  # fp32-on-CPU default
    # the forward in use, and the batch window that goes with it (unpadded ONNX: first come, first served)
    assert (info["batching"]["forward"], info["batching"]["window_items"]) in {("onnx", 1), ("torch", 0)}
    plan = plan_threads("cpu")
    assert (info["batching"]["inference_workers"], info["batching"]["torch_threads_per_worker"]) == (
        plan.workers,
        plan.threads_per_worker,
    )
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "reward_requests_total",
        "reward_request_duration_seconds_bucket",
        "reward_queue_wait_seconds",
        "reward_batch_size",
        "reward_batch_tokens",
        "reward_batch_real_tokens",
        "reward_queue_depth",
        "reward_scored_items_total",
        "reward_model_info",
    ):
        assert name in text, name
    assert 'reward_model_info{device="cpu",dtype="float32",model="tiny-bert-reward"' in text
    assert f"reward_inference_workers {plan.workers:.1f}" in text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/score", "/compare", "/get_reward"}
    assert client.get("/docs").status_code == 200


BAD_SCORE_BODIES = {
    "malformed json": ('{"items": [', ["body"]),
    "body not an object": ("[1, 2]", ["body"]),
    "missing items": ({}, ["body", "items"]),
    "empty items": ({"items": []}, ["body", "items"]),
    "items not a list": ({"items": {"text": "x"}}, ["body", "items"]),
    "item with no shape": ({"items": [{}]}, ["body", "items", 0]),
    "item with a mix of shapes": ({"items": [{"text": "a", "prompt": "b", "response": "c"}]}, ["body", "items", 0]),
    "prompt without response": ({"items": [{"prompt": "a"}]}, ["body", "items", 0]),
    "unknown field": ({"items": [{"txt": "a"}]}, ["body", "items", 0, "txt"]),
    "text not a string": ({"items": [{"text": 3}]}, ["body", "items", 0, "text"]),
    "text null only": ({"items": [{"text": None}]}, ["body", "items", 0]),
    "role not a string": (
        {"items": [{"messages": [{"role": 1, "content": "x"}]}]},
        ["body", "items", 0, "messages", 0, "role"],
    ),
    "content not a string": (
        {"items": [{"messages": [{"role": "user", "content": ["x"]}]}]},
        ["body", "items", 0, "messages", 0, "content"],
    ),
    "message without role": (
        {"items": [{"messages": [{"content": "x"}]}]},
        ["body", "items", 0, "messages", 0, "role"],
    ),
    "empty messages": ({"items": [{"messages": []}]}, ["body", "items", 0, "messages"]),
    "messages not a list": ({"items": [{"messages": "hi"}]}, ["body", "items", 0, "messages"]),
    "normalize not a bool": ({"items": [{"text": "a"}], "normalize": "yes"}, ["body", "normalize"]),
    "second item bad": ({"items": [{"text": "a"}, {"text": 1.5}]}, ["body", "items", 1, "text"]),
    "text over the character cap": ({"items": [{"text": "x" * 2001}]}, ["body", "items", 0, "text"]),
    "message over the character cap": (
        {"items": [{"messages": [{"role": "u", "content": "x" * 2001}]}]},
        ["body", "items", 0, "messages", 0, "content"],
    ),
}


@pytest.mark.parametrize("body, loc", BAD_SCORE_BODIES.values(), ids=list(BAD_SCORE_BODIES))
def test_bad_score_requests_get_422_naming_the_field(client, body, loc):
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/score", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(list(err["loc"][: len(loc)]) == loc for err in detail), detail


BAD_OTHER_BODIES = {
    "compare: empty pairs": ("/compare", {"pairs": []}, ["body", "pairs"]),
    "compare: missing rejected": ("/compare", {"pairs": [{"chosen": "a"}]}, ["body", "pairs", 0, "rejected"]),
    "compare: chosen not text or messages": (
        "/compare",
        {"pairs": [{"chosen": 1, "rejected": "b"}]},
        ["body", "pairs", 0, "chosen"],
    ),
    "compare: text prompt with message answers": (
        "/compare",
        {
            "pairs": [
                {"prompt": "p", "chosen": [{"role": "a", "content": "x"}], "rejected": [{"role": "a", "content": "y"}]}
            ]
        },
        ["body", "pairs", 0],
    ),
    "get_reward: missing query": ("/get_reward", {"prompts": ["a"]}, ["body", "query"]),
    "get_reward: query not strings": ("/get_reward", {"query": [1]}, ["body", "query", 0]),
    "get_reward: query too long": ("/get_reward", {"query": ["x" * 2001]}, ["body", "query", 0]),
}


@pytest.mark.parametrize("route, body, loc", BAD_OTHER_BODIES.values(), ids=list(BAD_OTHER_BODIES))
def test_bad_compare_and_get_reward_requests_get_422(client, route, body, loc):
    response = client.post(route, json=body)
    assert response.status_code == 422, response.text
    assert any(list(err["loc"][: len(loc)]) == loc for err in response.json()["detail"]), response.text


def test_messages_without_a_chat_template_get_422_naming_the_item(plain_classifier_dir: Path):
    settings = make_settings(plain_classifier_dir, reward_label="nothate")
    with app_client(settings) as c:
        response = c.post("/score", json={"items": [{"text": "ok"}, {"messages": [{"role": "u", "content": "x"}]}]})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "items", 1]
        assert "chat template" in response.json()["detail"][0]["msg"]


def test_a_plain_classifier_is_served_with_the_chosen_label(plain_classifier_dir: Path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["hello world", "you are terrible"]
    tokenizer = AutoTokenizer.from_pretrained(plain_classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(plain_classifier_dir).eval()
    with torch.no_grad():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits[0, 1].item() for t in texts]
    with app_client(make_settings(plain_classifier_dir, reward_label="nothate", max_length=4)) as c:
        info = c.get("/info").json()
        assert info["has_manifest"] is False and info["reward_label"] == "1:nothate"
        assert info["normalization"] is None and info["formatting"]["max_length"] == 4
        body = c.post("/score", json={"items": [{"text": t} for t in texts]}).json()
        assert body["truncated"] == [False, True]
        assert body["scores"][0] == pytest.approx(expected[0], abs=1e-4)  # batched vs alone: neighbours
        response = c.post("/score", json={"items": [{"text": "a"}], "normalize": True})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "normalize"]


def test_a_multi_class_model_without_reward_label_fails_to_load_visibly(plain_classifier_dir: Path):
    with app_client(make_settings(plain_classifier_dir)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "reward-label" in ready.json()["failure"]
        assert c.get("/healthz").status_code == 503
        assert c.post("/score", json={"items": [{"text": "a"}]}).status_code == 503


def test_every_setting_is_a_flag_and_an_environment_variable(monkeypatch):
    from service.cli import main, parse_settings

    monkeypatch.setenv("REWARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("REWARD_API_KEY", "secret")
    settings = parse_settings(
        [
            "--model",
            "ckpt",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--max-batch-tokens",
            "1024",
            "--max-wait-ms",
            "2.5",
            "--reward-label",
            "nothate",
            "--port",
            "9000",
            "--max-queue-tokens",
            "4096",
        ]
    )
    assert (settings.model, settings.dtype, settings.device, settings.port) == (["ckpt"], "bfloat16", "cpu", 9000)
    assert (settings.max_batch_tokens, settings.max_wait_ms, settings.max_batch_size) == (1024, 2.5, 7)
    assert settings.reward_label == "nothate" and settings.host == "127.0.0.1"
    assert settings.api_key.get_secret_value() == "secret" and settings.public_dict()["api_key"] == "set"
    assert parse_settings(["--model", "m", "--max-batch-size", "3"]).max_batch_size == 3  # flags win
    assert settings.batch_overhead_tokens == 0  # default: batches fill to the limits
    assert main(["--model", "m", "--dtype", "float64"]) == 2


def test_default_batch_tokens_follow_the_device_the_dtype_and_the_cpu():
    from service.settings import GPU_BATCH_TOKENS

    amx = {"amx_tile": True, "amx_bf16": True, "amx_int8": True, "avx512_bf16": True, "avx512_f": True}
    avx512_bf16 = {"amx_tile": False, "amx_bf16": False, "avx512_bf16": True, "avx512_f": True}  # e.g. AMD Zen 4/5
    avx2 = {"avx2": True}
    settings = make_settings("ckpt")
    assert settings.max_batch_tokens is None
    for cpu in (amx, avx512_bf16, avx2):
        assert settings.batch_tokens_for("cpu", "float32", cpu) == 1024
    assert settings.batch_tokens_for("cpu", "bfloat16", amx) == 2048  # matrix units: bigger batches pay
    assert settings.batch_tokens_for("cpu", "bfloat16", avx512_bf16) == 1024
    assert settings.batch_tokens_for("cpu", "bfloat16", avx2) == 1024
    assert settings.batch_tokens_for("cpu", "float16", amx) == 1024  # AMX-BF16 alone does not multiply float16
    assert settings.batch_tokens_for("cpu", "float16", amx | {"amx_fp16": True}) == 2048
    assert settings.batch_tokens_for("cuda:0", "float16", amx) == GPU_BATCH_TOKENS
    assert make_settings("ckpt", max_queue_tokens=512).batch_tokens_for("cuda:0", "float16") == 512  # queue holds one
    assert make_settings("ckpt", max_batch_tokens=4096).batch_tokens_for("cpu", "float32") == 4096  # as set wins


def test_the_cpu_is_split_between_two_inference_workers_unless_told_otherwise():
    from service.backend import ThreadPlan, plan_threads

    def plan(**kwargs):
        return plan_threads("cpu", available=8, **kwargs)  # OMP_NUM_THREADS=8, or 8 physical cores

    assert plan() == ThreadPlan(workers=2, threads_per_worker=4)
    assert plan(workers=1) == ThreadPlan(1, 8)
    assert plan(workers=3) == ThreadPlan(3, 2)
    assert plan(threads=8) == ThreadPlan(1, 8)  # one worker already fills torch's threads
    assert plan(threads=2) == ThreadPlan(2, 2)
    assert plan(workers=4, threads=1) == ThreadPlan(4, 1)
    assert plan_threads("cpu", available=1) == ThreadPlan(1, 1)
    assert plan_threads("cuda") == ThreadPlan(1, None)  # a GPU: one worker, torch's threads left alone


def test_the_thread_plan_reads_torch_before_any_worker_changed_it():
    """A thread started after another called torch.set_num_threads inherits that value: the plan must not."""
    import threading

    import torch

    from service.backend import plan_threads, torch_default_threads

    def in_a_new_thread(function, *args):
        out = []
        thread = threading.Thread(target=lambda: out.append(function(*args)))
        thread.start()
        thread.join()
        return out[0]

    default = torch_default_threads()
    in_a_new_thread(torch.set_num_threads, 1)  # as an inference worker does
    try:
        assert in_a_new_thread(plan_threads, "cpu") == plan_threads("cpu", available=default)
    finally:
        in_a_new_thread(torch.set_num_threads, default)


def test_batch_settings_reach_the_batcher_limits():
    from service.engine import batch_limits

    settings = make_settings(
        "ckpt", max_batch_tokens=1024, max_batch_size=7, max_wait_ms=2.5, batch_overhead_tokens=128
    )
    limits = batch_limits(settings)
    assert (limits.max_batch_tokens, limits.max_batch_size, limits.overhead_tokens) == (1024, 7, 128)
    assert limits.max_wait_s == pytest.approx(0.0025)


def test_short_requests_are_tokenized_on_the_event_loop_and_long_ones_in_a_thread():
    """A one-text request skips the thread hop; a long one never blocks the event loop while it tokenizes."""
    import asyncio
    import threading

    from service.batching import Batcher, BatchLimits
    from service.engine import Scorer
    from training.formatting import Encoded

    tokenized_on: list[threading.Thread] = []

    class RecordingEncoder:
        def encode(self, item):
            tokenized_on.append(threading.current_thread())
            return Encoded(input_ids=[1, 2, 3], truncated=False, original_length=3)

    batcher = Batcher(lambda batch: [float(len(ids)) for ids in batch], BatchLimits(max_wait_s=0.0)).start()
    scorer = Scorer(RecordingEncoder(), batcher, request_timeout_s=10, inline_chars=100)
    requests = [
        [{"text": "x" * 100}],  # at the limit: on the loop
        [{"prompt": "x" * 60, "response": "y" * 41}],  # 101 characters: in a thread
        [{"messages": [{"role": "user", "content": "z" * 101}]}],
        [{"text": "x" * 50}, {"text": "x" * 51}],  # the request's total counts
    ]

    async def main() -> threading.Thread:
        for items in requests:
            scored = await scorer.run(items, locs=[["body", "items", i] for i in range(len(items))])
            assert scored.scores == [3.0] * len(items)  # exact: the fake forward's float(len(ids)), passed through
        return threading.current_thread()

    loop_thread = asyncio.run(main())
    assert batcher.stop(5)
    assert tokenized_on[0] is loop_thread
    assert all(thread is not loop_thread for thread in tokenized_on[1:]), tokenized_on
