"""Graceful shutdown and liveness under load, against a real ``reward-serve`` process."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import build_tiny_bert
from tests.fixtures.servers import ServerProcess, metric_value

pytestmark = pytest.mark.slow  # reward-serve subprocesses stopped by signals

REQUESTS = 48
ITEMS_PER_REQUEST = 16
SECRET_WORD = "zanzibarquux"  # must never appear in the server's log


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger random BERT (hidden 256, 4 layers): ~0.1-0.2 s per full batch on one CPU thread, so a queue of
    work takes seconds to drain and the shutdown can be observed mid-way."""
    return build_tiny_bert(tmp_path_factory.mktemp("slow") / "bert", hidden_size=256, layers=4, max_length=64)


def long_text(i: int, j: int) -> str:
    return f"request {i} item {j} {SECRET_WORD} " + "the quick brown fox jumps over the lazy dog " * 6


def test_sigterm_under_load_answers_every_accepted_request(slow_checkpoint: Path):
    server = ServerProcess(
        ["--model", str(slow_checkpoint), "--torch-threads", "1", "--max-wait-ms", "5", "--drain-timeout-s", "60"]
    ).start()
    url = server.url
    try:

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as load, httpx.AsyncClient(base_url=url) as probe:
                tasks = [
                    asyncio.create_task(
                        load.post(
                            "/score", json={"items": [{"text": long_text(i, j)} for j in range(ITEMS_PER_REQUEST)]}
                        )
                    )
                    for i in range(REQUESTS)
                ]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # until every request is accepted and the model is saturated
                    metrics = (await probe.get("/metrics")).text
                    if metric_value(metrics, "reward_requests_in_flight") == REQUESTS:
                        break
                    await asyncio.sleep(0.01)
                assert metric_value(metrics, "reward_requests_in_flight") == REQUESTS
                latencies = []
                for _ in range(100):
                    started = time.perf_counter()
                    assert (await probe.get("/healthz")).status_code == 200
                    latencies.append(time.perf_counter() - started)
                busy = metric_value((await probe.get("/metrics")).text, "reward_queue_depth")

                server.terminate()  # SIGTERM while the queue is still full
                signalled = time.monotonic()
                deadline = signalled + 5
                while (ready := await probe.get("/readyz")).status_code == 200 and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                refused = await probe.post("/score", json={"items": [{"text": "too late"}]})
                responses = await asyncio.gather(*tasks, return_exceptions=True)
                return latencies, busy, ready, refused, responses, time.monotonic() - signalled

        latencies, busy, ready, refused, responses, drained_after = asyncio.run(main())
        exit_code = server.wait(timeout=60)
    finally:
        server.stop()

    latencies.sort()
    p99 = latencies[98]
    print(
        f"\n/healthz under saturation ({busy:.0f} items queued): p50 {latencies[49] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms; drained {REQUESTS} requests in {drained_after:.2f} s after SIGTERM"
    )
    assert busy > 0, "the model was not saturated while /healthz was measured"
    assert p99 < 0.1
    assert ready.status_code == 503 and ready.json()["phase"] == "draining"
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert [r.status_code for r in responses] == [200] * REQUESTS
    assert all(len(r.json()["scores"]) == ITEMS_PER_REQUEST for r in responses)
    assert exit_code == 0, server.log[-3000:]
    draining = re.search(r"received SIGTERM: draining (\d+) accepted request", server.log)
    assert draining and int(draining.group(1)) > 0, server.log[-3000:]  # some were still owed when it came
    assert SECRET_WORD not in server.log  # request bodies are not logged


def test_a_model_that_cannot_be_loaded_ends_the_process_with_an_error(tmp_path: Path):
    server = ServerProcess(["--model", str(tmp_path)])  # a folder without weights: fails in the loader thread
    with pytest.raises(RuntimeError, match="exited with 1"):
        server.start(ready_timeout=60)
    assert "no .safetensors weights" in server.log
    missing = ServerProcess(["--model", str(tmp_path / "missing")])  # no folder at all: refused before serving
    with pytest.raises(RuntimeError, match="exited with 2"):
        missing.start(ready_timeout=60)
    assert "no such checkpoint folder" in missing.log
