"""Limits, backpressure, faults and access control, in-process with a controllable backend (no timing games)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.fixtures.servers import ControlledBackend, ThreadedServer, app_client, make_settings, metric_value

ITEM = {"text": "hello world"}  # [CLS] hello world [SEP]: 4 tokens


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling interval; the deadline bounds the wait


def test_overload_gets_429_with_retry_after_then_serves_normally(controlled: ControlledBackend, tiny_reward_checkpoint):
    settings = make_settings(
        tiny_reward_checkpoint, inference_workers=1, max_batch_tokens=64, max_queue_tokens=64, max_wait_ms=0
    )
    with ThreadedServer(settings, controlled) as server:
        controlled.gate.clear()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
                await asyncio.to_thread(controlled.in_forward.wait, 10)  # the worker is now held
                rest = [asyncio.create_task(client.post("/score", json={"items": [ITEM]})) for _ in range(40)]
                deadline = time.monotonic() + 20
                while sum(t.done() for t in rest) < 24 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                refused = [t.result() for t in rest if t.done()]
                controlled.gate.set()
                answered = await asyncio.gather(first, *rest)
                after = await client.post("/score", json={"items": [ITEM, ITEM]})
                metrics = (await client.get("/metrics")).text
                return refused, answered, after, metrics

        refused, answered, after, metrics = asyncio.run(main())
    codes = sorted(r.status_code for r in answered)
    assert codes == [200] * 17 + [429] * 24, codes  # 64 queued tokens = 16 waiting requests, plus the one held
    assert len(refused) == 24 and all(r.status_code == 429 for r in refused)
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
    assert after.status_code == 200
    assert metric_value(metrics, "reward_rejected_requests_total", {"reason": "overloaded"}) == 24
    assert metric_value(metrics, "reward_queue_depth") == 0


def test_a_timed_out_request_gets_504_and_its_items_are_never_computed(controlled, tiny_reward_checkpoint):
    settings = make_settings(tiny_reward_checkpoint, inference_workers=1, request_timeout_s=0.5, max_wait_ms=0)
    with ThreadedServer(settings, controlled) as server:
        controlled.gate.clear()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                held = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
                await asyncio.to_thread(controlled.in_forward.wait, 10)
                queued = await client.post("/score", json={"items": [{"text": "the sky is blue"}] * 3})
                depth = metric_value((await client.get("/metrics")).text, "reward_queue_depth")
                controlled.gate.set()
                return await held, queued, depth, await client.post("/score", json={"items": [ITEM]})

        held, queued, depth, after = asyncio.run(main())
    assert queued.status_code == 504 and "timeout" in queued.json()["detail"]
    assert held.status_code == 504  # it was in the held forward past its own deadline
    assert depth == 0  # its items left the queue at once
    sky = controlled.formatter.tokenizer.convert_tokens_to_ids("sky")
    assert sky not in controlled.computed_tokens()  # dropped, not computed
    assert after.status_code == 200


def test_a_client_that_goes_away_costs_no_compute(controlled, tiny_reward_checkpoint):
    settings = make_settings(tiny_reward_checkpoint, inference_workers=1, max_wait_ms=0)
    with ThreadedServer(settings, controlled) as server:
        controlled.gate.clear()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                held = asyncio.create_task(client.post("/score", json={"items": [ITEM]}))
                await asyncio.to_thread(controlled.in_forward.wait, 10)
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/score", json={"items": [{"text": "the sky is blue"}] * 3}, timeout=0.5)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    metrics = (await client.get("/metrics")).text
                    if metric_value(metrics, "reward_rejected_requests_total", {"reason": "client_closed_request"}):
                        break
                    await asyncio.sleep(0.02)
                depth = metric_value(metrics, "reward_queue_depth")
                controlled.gate.set()
                return (await held).status_code, depth, metrics

        held, depth, metrics = asyncio.run(main())
    assert held == 200 and depth == 0
    assert metric_value(metrics, "reward_rejected_requests_total", {"reason": "client_closed_request"}) == 1
    assert controlled.formatter.tokenizer.convert_tokens_to_ids("sky") not in controlled.computed_tokens()


def test_a_failing_forward_fails_only_its_batch(controlled, tiny_reward_checkpoint):
    settings = make_settings(tiny_reward_checkpoint, max_batch_size=1, max_wait_ms=0)
    with ThreadedServer(settings, controlled) as server:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                poisoned, healthy = await asyncio.gather(
                    client.post("/score", json={"items": [{"text": "a terrible answer"}]}),
                    client.post("/score", json={"items": [{"text": "a good answer"}]}),
                )
                after = await client.post("/score", json={"items": [{"text": "a good answer"}, ITEM]})
                return poisoned, healthy, after, (await client.get("/metrics")).text

        poisoned, healthy, after, metrics = asyncio.run(main())
    assert poisoned.status_code == 500 and "injected fault" in poisoned.json()["detail"]
    assert healthy.status_code == 200 and after.status_code == 200
    assert after.json()["scores"][0] == pytest.approx(healthy.json()["scores"][0], abs=1e-4)  # in 2 vs alone
    assert metric_value(metrics, "reward_forward_failures_total") == 1


def test_out_of_memory_becomes_batch_too_large(monkeypatch, tiny_reward_checkpoint):
    import training.checkpoint
    from service.backend import CheckpointBackend
    from service.batching import BatchTooLarge

    backend = CheckpointBackend.load(tiny_reward_checkpoint, device="cpu")

    def out_of_memory(checkpoint, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training.checkpoint, "forward_scores", out_of_memory)
    with pytest.raises(BatchTooLarge):
        backend.forward([[2, 3]])


def test_probes_answer_while_loading_and_scoring_waits(controlled, tiny_reward_checkpoint):
    controlled.warm_gate.clear()
    settings = make_settings(tiny_reward_checkpoint)
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings, controlled)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["phase"] == "loading"
        response = client.post("/score", json={"items": [ITEM]})
        assert response.status_code == 503 and "retry-after" in response.headers
        assert client.get("/metrics").status_code == 200
        controlled.warm_gate.set()
        assert app.state.runtime.wait_until_loaded(30)
        assert client.get("/readyz").status_code == 200
        assert client.post("/score", json={"items": [ITEM]}).status_code == 200


def test_scoring_routes_require_the_api_key_probes_stay_open(tiny_reward_checkpoint):
    with app_client(make_settings(tiny_reward_checkpoint, api_key="s3cret")) as client:
        for route, body in (
            ("/score", {"items": [ITEM]}),
            ("/compare", {"pairs": [{"chosen": "a", "rejected": "b"}]}),
            ("/get_reward", {"query": ["a"]}),
        ):
            missing = client.post(route, json=body)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            assert client.post(route, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.post(route, json=body, headers={"Authorization": "Basic s3cret"}).status_code == 401
            assert client.post(route, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for route in ("/healthz", "/readyz", "/metrics", "/info"):
            assert client.get(route).status_code == 200


def test_body_size_limit_is_checked_before_parsing(tiny_reward_checkpoint):
    with app_client(make_settings(tiny_reward_checkpoint, max_body_bytes=2000)) as client:
        big = b'{"items": [{"text": "' + b"x" * 3000 + b'"}]}'
        declared = client.post("/score", content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "2000 bytes" in declared.json()["detail"]

        def chunks():  # no Content-Length: counted while reading
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        streamed = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        not_json = client.post("/score", content=b"{" * 3000, headers={"content-type": "application/json"})
        assert not_json.status_code == 413  # never parsed
        assert client.post("/score", json={"items": [ITEM]}).status_code == 200


def test_too_many_items_and_oversized_requests_are_refused(tiny_reward_checkpoint):
    settings = make_settings(tiny_reward_checkpoint, max_items_per_request=4, max_batch_tokens=32, max_queue_tokens=32)
    with app_client(settings) as client:
        too_many = client.post("/score", json={"items": [ITEM] * 5})
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "items"]
        assert client.post("/get_reward", json={"query": ["a"] * 5}).status_code == 422
        too_big = client.post("/score", json={"items": [{"text": "hello world " * 20}] * 2})  # 2 x 42 tokens > 32
        assert too_big.status_code == 413 and "queue limit" in too_big.json()["detail"]
