"""``--drain-timeout-s`` bounds the whole shutdown: under more work than fits, a real ``reward-serve`` answers every
accepted request (scores, or 503 with Retry-After for what could not be scored in time), none is cut off, and the
process exits 0 within the drain timeout of the signal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import build_tiny_bert
from tests.fixtures.servers import ServerProcess, metric_value

DRAIN_TIMEOUT_S = 4.0
EXIT_SLACK_S = 1.0  # the interpreter's own exit after the server has stopped
REQUESTS = 128
ITEMS_PER_REQUEST = 32


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 256, 4 layers: a queue of 4,096 texts takes several seconds on one thread."""
    return build_tiny_bert(tmp_path_factory.mktemp("slow") / "bert", hidden_size=256, layers=4, max_length=64)


def wait_for_exit(server: ServerProcess) -> tuple[int, float]:
    code = server.wait(timeout=DRAIN_TIMEOUT_S + 30)
    return code, time.monotonic()


@pytest.mark.slow  # reward-serve as a subprocess, drained under load
def test_more_work_than_the_drain_allows_is_refused_in_time_not_cut_off(slow_checkpoint: Path):
    server = ServerProcess(
        ["--model", str(slow_checkpoint), "--torch-threads", "1", "--drain-timeout-s", str(DRAIN_TIMEOUT_S)],
        log_path=Path("/tmp/image-drain.log"),
    ).start(ready_timeout=180)
    # Short enough (under 4,096 characters a request) to be tokenized and queued as soon as it is admitted.
    text = "the quick brown fox jumps over the lazy dog " * 2
    body = {"items": [{"text": f"{j} {text}"} for j in range(ITEMS_PER_REQUEST)]}
    try:

        async def main():
            limits = httpx.Limits(max_connections=REQUESTS + 2)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
                tasks = [asyncio.create_task(client.post("/score", json=body)) for _ in range(REQUESTS)]
                deadline = time.monotonic() + 30
                while metric_value((await client.get("/metrics")).text, "reward_requests_in_flight") < REQUESTS // 2:
                    assert time.monotonic() < deadline, "the requests were never all in flight"
                    await asyncio.sleep(0.01)
                server.terminate()
                signalled = time.monotonic()
                # when the process ends, seen from a thread (this busy event loop would see it late)
                exit = asyncio.get_running_loop().run_in_executor(None, wait_for_exit, server)
                responses = await asyncio.gather(*tasks, return_exceptions=True)
                code, exited = await exit
                return responses, code, exited - signalled

        responses, code, exited_after = asyncio.run(main())
    finally:
        server.stop()

    cut_off = [r for r in responses if isinstance(r, BaseException)]
    assert not cut_off, f"{len(cut_off)} accepted request(s) cut off: {cut_off[:3]}\n{server.log[-3000:]}"
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "everything was scored within the drain timeout: the load must be larger to test the deadline"
    assert all(r.headers.get("retry-after") and "shutting down" in r.json()["detail"] for r in refused)
    assert code == 0, server.log[-3000:]
    assert exited_after <= DRAIN_TIMEOUT_S + EXIT_SLACK_S, (
        f"exited {exited_after:.2f} s after SIGTERM; the drain timeout is {DRAIN_TIMEOUT_S} s\n{server.log[-3000:]}"
    )
    print(f"\n{statuses.count(200)} scored, {len(refused)} refused; exited {exited_after:.2f} s after SIGTERM")
