"""The parts of the reliability and security plan that the limits and shutdown tests leave open: limits on
/compare, a client that meets a full queue and comes back when Retry-After says, the API key compared in constant
time, safetensors only and never remote code, and request bodies kept out of the logs (errors included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.commands import REPO
from tests.fixtures.servers import ThreadedServer, app_client, make_settings, metric_value

ITEM = {"text": "hello world"}  # [CLS] hello world [SEP]: 4 tokens
SECRET = "qwxzyplughsecret"  # must never reach a log line


def test_compare_limits_name_the_pair_and_field(tiny_reward_checkpoint):
    with app_client(make_settings(tiny_reward_checkpoint, max_items_per_request=2, max_text_chars=10)) as client:
        pair = {"chosen": "a", "rejected": "b"}
        too_many = client.post("/compare", json={"pairs": [pair] * 3})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "pairs"]
        assert "at most 2 pairs" in too_many.json()["detail"][0]["msg"]
        long_text = client.post(
            "/compare", json={"pairs": [pair, {"prompt": "p", "chosen": "a", "rejected": "x" * 11}]}
        )
        assert long_text.status_code == 422
        assert long_text.json()["detail"][0]["loc"] == ["body", "pairs", 1, "rejected"]
        long_message = client.post(
            "/compare",
            json={
                "pairs": [
                    {
                        "chosen": [{"role": "user", "content": "a"}],
                        "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y" * 11}],
                    }
                ]
            },
        )
        assert long_message.status_code == 422
        assert long_message.json()["detail"][0]["loc"] == ["body", "pairs", 0, "rejected", 1, "content"]
        assert client.post("/compare", json={"pairs": [pair] * 2}).status_code == 200


def test_the_client_waits_as_retry_after_says_and_nothing_is_lost(controlled, tiny_reward_checkpoint, monkeypatch):
    """End to end: a full queue answers 429 + Retry-After; RewardClient sleeps that long, retries, and is scored."""
    from service import client as client_module
    from service.client import RetryPolicy, RewardClient

    settings = make_settings(
        tiny_reward_checkpoint, inference_workers=1, max_batch_tokens=64, max_queue_tokens=64, max_wait_ms=0
    )
    with ThreadedServer(settings, controlled) as server:
        batcher = server.runtime.engine.batcher
        controlled.gate.clear()
        slept: list[float] = []
        real_sleep = time.sleep  # client_module.time is the time module: the patch below is global

        def sleep(seconds: float) -> None:  # the client's backoff: record it, and let the queue drain meanwhile
            slept.append(seconds)
            controlled.gate.set()
            deadline = time.monotonic() + 10
            while batcher.queue_depth and time.monotonic() < deadline:
                real_sleep(0.01)

        monkeypatch.setattr(client_module.time, "sleep", sleep)

        async def fill() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                held = asyncio.create_task(http.post("/score", json={"items": [ITEM]}))
                await asyncio.to_thread(controlled.in_forward.wait, 10)  # the worker is held in a forward pass
                filler = asyncio.create_task(http.post("/score", json={"items": [ITEM] * 16}))  # 64 tokens queued
                while batcher.queued_tokens < 64:
                    await asyncio.sleep(0.005)
                with RewardClient(server.url, retry=RetryPolicy(max_retries=3), timeout=30) as rm:
                    result = await asyncio.to_thread(rm.score, ["hello world", "the sky is blue"])
                return [await held, await filler], result, (await http.get("/metrics")).text

        (held, filler), result, metrics = asyncio.run(fill())
    assert slept and slept[0] == 1.0  # the server's Retry-After, a whole number of seconds (its 1 s floor)
    assert metric_value(metrics, "reward_rejected_requests_total", {"reason": "overloaded"}) == len(slept)
    assert held.status_code == 200 and filler.status_code == 200 and len(filler.json()["scores"]) == 16
    assert len(result.scores) == 2 and result.scores[0] == pytest.approx(held.json()["scores"][0], abs=1e-4)


def test_the_api_key_is_compared_in_constant_time(tiny_reward_checkpoint, monkeypatch):
    import hmac

    import service.api.common

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.api.common.hmac, "compare_digest", spy)
    with app_client(make_settings(tiny_reward_checkpoint, api_key="k3y-value")) as client:
        assert (
            client.post("/score", json={"items": [ITEM]}, headers={"Authorization": "Bearer k3y-valuX"}).status_code
            == 401
        )
        assert client.post("/score", json={"items": [ITEM]}).status_code == 401
        assert (
            client.post("/score", json={"items": [ITEM]}, headers={"Authorization": "Bearer k3y-value"}).status_code
            == 200
        )
        assert client.get("/metrics").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert calls == [(b"k3y-valuX", b"k3y-value"), (b"", b"k3y-value"), (b"k3y-value", b"k3y-value")]


def _plain_copy(source: Path, target: Path) -> Path:
    """The checkpoint's config, tokenizer and manifest, without its weights (nor an exported ONNX graph)."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    return target


def test_pickle_weights_are_refused_with_a_clear_error(tiny_reward_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file

    from service.backend import CheckpointBackend
    from training.checkpoint import CheckpointError

    folder = _plain_copy(tiny_reward_checkpoint, tmp_path / "bin-only")
    state = load_file(str(tiny_reward_checkpoint / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights \(only safetensors checkpoints are loaded\)"):
        CheckpointBackend.load(folder, device="cpu")
    with app_client(make_settings(folder)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "only safetensors" in ready.json()["failure"]
        assert client.post("/score", json={"items": [ITEM]}).status_code == 503


def test_remote_code_in_a_checkpoint_is_never_run(tiny_reward_checkpoint, tmp_path):
    from service.backend import CheckpointBackend
    from training.checkpoint import CheckpointError

    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_reward_checkpoint, folder)
    marker = tmp_path / "remote-code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "evil_model.py").write_text(
        code + "from transformers import BertConfig as EvilConfig, BertForSequenceClassification as EvilModel\n"
    )
    (folder / "evil_tokenizer.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil_model.EvilConfig",
        "AutoModelForSequenceClassification": "evil_model.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with contextlib.suppress(CheckpointError):  # served as the built-in architecture, or refused
        CheckpointBackend.load(folder, device="cpu")
    assert not marker.exists(), "code shipped in the checkpoint folder was executed"


def test_no_code_path_enables_remote_code():
    """Every from_pretrained in the service and training code says trust_remote_code=False; nothing sets it True."""
    sources = [*sorted((REPO / "service").glob("*.py")), *sorted((REPO / "training").glob("*.py"))]
    calls = 0
    for path in sources:
        text = path.read_text()
        for setting in re.findall(r"trust_remote_code\s*=\s*([^,)\s]+)", text):
            assert setting == "False", (path, setting)
        for line in text.splitlines():
            if ".from_pretrained(" in line:
                calls += 1
                assert "trust_remote_code=False" in line, (path, line)
    assert calls >= 2  # the tokenizer and the model (training/checkpoint.py)


def test_request_bodies_are_not_logged_even_when_they_fail(controlled, tiny_reward_checkpoint, caplog):
    """Every kind of answer, with the root logger at DEBUG: scored, invalid, too large, failed forward, timed out."""
    caplog.set_level(logging.DEBUG)
    settings = make_settings(
        tiny_reward_checkpoint,
        inference_workers=1,
        max_body_bytes=4096,
        request_timeout_s=0.5,
        max_wait_ms=0,
        api_key="k",
    )
    auth = {"Authorization": "Bearer k"}
    with ThreadedServer(settings, controlled) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        statuses = [
            http.post("/score", json={"items": [{"text": f"hello {SECRET}"}]}, headers=auth).status_code,
            http.post("/score", json={"items": [{"text": SECRET, "prompt": SECRET}]}, headers=auth).status_code,
            http.post("/compare", content=f'{{"pairs": [{{"chosen": "{SECRET}"'.encode(), headers=auth).status_code,
            http.post("/get_reward", json={"query": [SECRET * 400]}, headers=auth).status_code,
            http.post("/score", json={"items": [{"text": f"terrible {SECRET}"}]}, headers=auth).status_code,
            http.post(
                "/score", json={"items": [{"text": SECRET}]}, headers={"Authorization": f"Bearer {SECRET}"}
            ).status_code,
        ]
        controlled.gate.clear()
        worker = threading.Thread(
            target=lambda: statuses.append(
                http.post("/score", json={"items": [{"text": SECRET}]}, headers=auth).status_code
            )
        )
        worker.start()
        worker.join(20)
        controlled.gate.set()
    assert statuses == [200, 422, 422, 413, 500, 401, 504]
    assert any(r.name.startswith("reward.") for r in caplog.records)  # the service's own logs were captured
    assert SECRET not in caplog.text
