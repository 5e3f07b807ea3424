"""The Python client against mock transports: retries, backoff, Retry-After, sharding, TRL reward function."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys

import httpx
import pytest

from service import client as client_module
from service.client import (
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
    RewardFunction,
    RewardRequestError,
    RewardServiceError,
    RewardServiceUnreachable,
)

FAST = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.002)


def ok_scores(request: httpx.Request) -> httpx.Response:
    items = json.loads(request.content)["items"]
    return httpx.Response(
        200,
        json={
            "scores": [float(len(i.get("text", i.get("response", "")))) for i in items],
            "truncated": [False] * len(items),
            "model": "m",
            "model_version": "v",
        },
    )


class Recorder:
    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(step, Exception):
            raise step
        return step(request) if callable(step) else step


@pytest.fixture
def no_sleep(monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", delays.append)
    return delays


def test_5xx_and_429_are_retried_honouring_retry_after(no_sleep):
    recorder = Recorder(httpx.Response(503), httpx.Response(429, headers={"Retry-After": "2"}), ok_scores)
    with RewardClient("http://rm", transport=httpx.MockTransport(recorder), retry=FAST) as client:
        assert client.score(["abc"]).scores == [3.0]  # exact: the mock's float(len(text))
    assert len(recorder.requests) == 3
    assert no_sleep[1] == 2.0 and no_sleep[0] < 0.01  # exact: Retry-After: 2, parsed


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422])
def test_other_4xx_are_not_retried(status, no_sleep):
    recorder = Recorder(httpx.Response(status, json={"detail": "nope"}))
    with (
        RewardClient("http://rm", transport=httpx.MockTransport(recorder), retry=FAST) as client,
        pytest.raises(RewardRequestError) as info,
    ):
        client.score(["abc"])
    assert info.value.status_code == status and info.value.detail == "nope"
    assert len(recorder.requests) == 1 and no_sleep == []


def test_retries_give_up_after_the_limit(no_sleep):
    recorder = Recorder(httpx.Response(500, json={"detail": "boom"}))
    with (
        RewardClient("http://rm", transport=httpx.MockTransport(recorder), retry=FAST) as client,
        pytest.raises(RewardServiceError) as info,
    ):
        client.score(["abc"])
    assert info.value.status_code == 500 and len(recorder.requests) == 4
    recorder = Recorder(httpx.ConnectError("refused"))
    with (
        RewardClient("http://rm", transport=httpx.MockTransport(recorder), retry=FAST) as client,
        pytest.raises(RewardServiceUnreachable),
    ):
        client.score(["abc"])


def test_a_connection_error_fails_over_to_the_next_replica(no_sleep):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused")
        return ok_scores(request)

    with RewardClient(["http://down", "http://up"], transport=httpx.MockTransport(handler), retry=FAST) as client:
        for _ in range(4):
            assert client.score(["ab", "abcd"]).scores == [2.0, 4.0]  # exact: the mock's numbers


def test_items_are_sharded_across_replicas_and_merged_in_order():
    recorder = Recorder(ok_scores)
    urls = ["http://a:1", "http://b:2"]
    with RewardClient(urls, transport=httpx.MockTransport(recorder), max_items_per_request=2, api_key="k") as client:
        result = client.score(["a", "bb", {"prompt": "p", "response": "ccc"}, "dddd", "eeeee"])
    assert result.scores == [1.0, 2.0, 3.0, 4.0, 5.0]  # exact: the mock's float(len(text)), merged in order
    assert len(recorder.requests) == 3
    assert {r.url.host for r in recorder.requests} == {"a", "b"}
    assert all(r.headers["authorization"] == "Bearer k" for r in recorder.requests)
    assert json.loads(recorder.requests[0].content) in (
        {"items": [{"text": "a"}, {"text": "bb"}], "normalize": False},
        {"items": [{"prompt": "p", "response": "ccc"}, {"text": "dddd"}], "normalize": False},
        {"items": [{"text": "eeeee"}], "normalize": False},
    )


def test_async_client_retries_and_shards():
    recorder = Recorder(httpx.Response(502), ok_scores)

    async def main():
        async with AsyncRewardClient(
            ["http://a", "http://b"], transport=httpx.MockTransport(recorder), retry=FAST, max_items_per_request=1
        ) as client:
            return await client.score(["x", "yy", "zzz"])

    assert asyncio.run(main()).scores == [1.0, 2.0, 3.0]  # exact: the mock's numbers
    assert len(recorder.requests) == 4


def test_reward_function_sends_trl_shapes_and_ignores_extra_columns(monkeypatch):
    from trl.trainer.utils import get_callable_name, is_async_callable

    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return ok_scores(request)

    reward = RewardFunction("http://rm", name="my_rm", transport=httpx.MockTransport(handler))
    assert is_async_callable(reward) and get_callable_name(reward) == "my_rm"

    plain = asyncio.run(
        reward.ascore(
            prompts=["p1", "p2"],
            completions=["c", "cc"],
            completion_ids=[[1], [2]],
            topic=["a", "b"],
            trainer_state=object(),
            log_extra=print,
        )
    )
    assert plain == [1.0, 2.0]  # exact: the mock's numbers
    assert sent[-1] == {
        "items": [{"prompt": "p1", "response": "c"}, {"prompt": "p2", "response": "cc"}],
        "normalize": False,
    }

    prompt = [{"role": "user", "content": "hi"}]
    reward(prompts=[prompt], completions=[[{"role": "assistant", "content": "yo"}]], ground_truth=["x"])  # blocking
    assert sent[-1]["items"] == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]

    copy = pickle.loads(pickle.dumps(RewardFunction("http://rm", normalize=True)))
    assert copy.normalize is True and copy.__name__ == "reward_service"


def test_the_client_imports_without_torch_transformers_or_fastapi():
    code = (
        "import sys, service.client, service.verl; "
        "loaded = [m for m in ('torch', 'transformers', 'fastapi', 'starlette', 'pydantic', 'prometheus_client') "
        "if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
