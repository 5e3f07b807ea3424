"""The RL-framework adapters of the client package against a real server: TRL's reward function (both ways TRL
tells async functions apart) and verl's custom reward functions (per sample, async, batch), with coalescing."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import threading
import types
from pathlib import Path

import httpx
import pytest

from service import verl
from service.client import RewardFunction
from tests.fixtures.servers import ServerProcess, metric_value

pytestmark = pytest.mark.slow  # the frameworks' calling conventions against a reward-serve subprocess

PROMPTS = ["what is two plus two? ", "say hello to the user. ", "what is two plus two? "]
COMPLETIONS = ["four", "hello there, how are you", "five i think"]
BATCH_NEIGHBOURS = 1e-4  # documented tolerance for the same item scored beside different neighbours


def direct_scores(server: ServerProcess, items: list[dict]) -> list[float]:
    response = httpx.post(server.url + "/score", json={"items": items}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["scores"]


def score_requests(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return metric_value(text, "reward_requests_total", {"route": "/score"})


@pytest.fixture(scope="module")
def expected(live_server: ServerProcess) -> list[float]:
    return direct_scores(live_server, [{"prompt": p, "response": c} for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])


# -- TRL --------------------------------------------------------------------------------------------------------------
def test_trl_1x_awaits_it_on_its_daemon_loop(live_server: ServerProcess, expected: list[float]):
    """TRL 1.x (installed): ``is_async_callable(f)`` checks ``inspect.iscoroutinefunction(f.__call__)``
    (trl/trainer/utils.py); ``GRPOTrainer._calculate_rewards`` then runs ``await func(prompts=..., completions=...,
    completion_ids=..., **reward_kwargs)`` in a coroutine on a daemon event loop (``start_event_loop_in_daemon``,
    ``asyncio.run_coroutine_threadsafe(...).result()``), alongside the other async reward functions."""
    from trl.trainer.utils import is_async_callable, start_event_loop_in_daemon

    reward = RewardFunction(live_server.url)
    assert is_async_callable(reward)
    thread, loop, ready = start_event_loop_in_daemon(name="trl-async-rewards")
    ready.wait()

    async def invoke():
        return await reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, trainer_state=None)

    try:
        scores = asyncio.run_coroutine_threadsafe(invoke(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_trl_0x_calls_it_synchronously_and_gets_the_list(live_server: ServerProcess, expected: list[float]):
    """TRL 0.2x ``GRPOTrainer._calculate_rewards`` (trl/trainer/grpo_trainer.py) separates async reward functions
    with ``inspect.iscoroutinefunction(reward_func)`` (``asyncio.iscoroutinefunction`` in some releases), which is
    False for an instance, and calls the others as ``reward_func(prompts=..., completions=..., completion_ids=...,
    **reward_kwargs)`` on the training thread, then iterates the result (``[r if r is not None else nan for r in
    output]``). TRL before async support (0.14 on) makes the same plain call. An async ``__call__`` handed it a
    coroutine: "'coroutine' object is not iterable"."""
    reward = RewardFunction(live_server.url)
    assert not inspect.iscoroutinefunction(reward) and not asyncio.iscoroutinefunction(reward)
    output = reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, trainer_state=None)
    scores = [r if r is not None else math.nan for r in output]
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)
    # again, from another thread (TRL's experimental async GRPO runs sync reward functions via asyncio.to_thread)
    scores = asyncio.run(asyncio.to_thread(reward, prompts=PROMPTS, completions=COMPLETIONS))
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_blocking_reward_function_returns_scores_even_inside_an_event_loop(
    live_server: ServerProcess, expected: list[float]
):
    """``blocking=True`` (an old TRL in a notebook, whose thread runs an event loop): a plain function to every
    TRL, and the call returns the scores, not an awaitable."""
    from trl.trainer.utils import is_async_callable

    reward = RewardFunction(live_server.url, blocking=True)
    assert not is_async_callable(reward) and not inspect.iscoroutinefunction(reward)

    async def notebook_cell():
        return reward(prompts=PROMPTS, completions=COMPLETIONS)

    assert asyncio.run(notebook_cell()) == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


# -- verl -------------------------------------------------------------------------------------------------------------
def load_like_verl(reward_kwargs: dict, name: str):
    """What verl's ``get_custom_reward_fn`` does: import the file at ``custom_reward_function.path`` as a module
    and call ``name`` with ``custom_reward_function.reward_kwargs`` merged into every call."""
    spec = importlib.util.spec_from_file_location("custom_module", Path(verl.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw = getattr(module, name)
    if inspect.iscoroutinefunction(raw):

        async def wrapped(*args, **kwargs):
            return await raw(*args, **{**kwargs, **reward_kwargs})

        return wrapped

    def wrapped_sync(*args, **kwargs):
        return raw(*args, **{**kwargs, **reward_kwargs})

    return wrapped_sync


def test_verl_naive_manager_per_sample_calls(live_server: ServerProcess, expected: list[float]):
    """verl's naive reward manager: ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` once
    per sample, a float (or a dict with "score") back."""
    compute_score = load_like_verl({"reward_service_url": live_server.url}, "compute_score")
    scores = [
        compute_score(data_source="hh", solution_str=c, ground_truth=None, extra_info={"prompt": p, "index": i})
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
    ]
    assert all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_verl_async_reward_loop_calls_coalesce_into_one_request(live_server: ServerProcess, expected: list[float]):
    """verl's asynchronous reward loop awaits ``compute_score`` per sample, all samples of a batch at once
    (``asyncio.gather``): the calls become one HTTP request."""
    compute_score = load_like_verl({"reward_service_url": live_server.url}, "compute_score_async")
    assert inspect.iscoroutinefunction(compute_score)

    async def reward_loop():
        return await asyncio.gather(
            *(
                compute_score(data_source="hh", solution_str=c, ground_truth="", extra_info={"prompt": p})
                for p, c in zip(PROMPTS * 4, COMPLETIONS * 4, strict=True)
            )
        )

    before = score_requests(live_server)
    scores = asyncio.run(reward_loop())
    assert score_requests(live_server) - before == 1
    assert scores == pytest.approx(expected * 4, abs=BATCH_NEIGHBOURS)


def test_verl_sync_calls_from_threads_get_their_own_scores(live_server: ServerProcess, expected: list[float]):
    """The reward loop runs a plain ``compute_score`` in an executor (threads): each thread blocks on its own
    sample while the calls share requests on one background loop; every thread gets its own sample's score."""
    compute_score = load_like_verl({"reward_service_url": live_server.url}, "compute_score")
    calls = list(zip(PROMPTS * 4, COMPLETIONS * 4, strict=True))
    results: list[float | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def worker(i: int, prompt: str, completion: str) -> None:
        start.wait(10)
        results[i] = compute_score(data_source="hh", solution_str=completion, extra_info={"prompt": prompt})

    threads = [threading.Thread(target=worker, args=(i, p, c)) for i, (p, c) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == pytest.approx(expected * 4, abs=BATCH_NEIGHBOURS)


class HeldClient:
    """Stands in for AsyncRewardClient: records each request's items and holds it until released."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.arrived: asyncio.Queue[list[str]] = asyncio.Queue()
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def score(self, items, normalize=False):
        self.requests.append([item["text"] for item in items])
        self.arrived.put_nowait(self.requests[-1])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return types.SimpleNamespace(scores=[float(len(item["text"])) for item in items])


def test_coalescer_sends_a_lone_call_at_once_and_joins_calls_that_wait():
    async def main():
        client = HeldClient()
        coalescer = verl.Coalescer(client, max_in_flight=1)
        first = asyncio.create_task(coalescer.score([{"text": "a"}]))
        assert await asyncio.wait_for(client.arrived.get(), 5) == ["a"]  # a lone call is sent without waiting
        # while it is in flight, more calls queue; one of them is cancelled before it is sent
        later = [asyncio.create_task(coalescer.score([{"text": t}])) for t in ("bb", "ccc", "dddd")]
        gone = asyncio.create_task(coalescer.score([{"text": "gone"}]))
        await asyncio.sleep(0)  # yield once: the tasks just created run up to their wait
        gone.cancel()
        assert client.requests == [["a"]]  # no second request while the only slot is taken
        client.release.set()
        results = await asyncio.gather(first, *later)
        assert client.requests == [["a"], ["bb", "ccc", "dddd"]]
        assert results == [[1.0], [2.0], [3.0], [4.0]]  # exact: the fake client's numbers, routed back
        # a failed request fails every call that was in it
        client.fail = RuntimeError("boom")
        calls = [coalescer.score([{"text": "x"}]), coalescer.score([{"text": "y"}])]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
        assert client.requests[-1] == ["x", "y"]

    asyncio.run(main())


def test_verl_batch_manager_lists(live_server: ServerProcess, expected: list[float]):
    """``reward_manager=batch`` calls ``compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=,
    **reward_kwargs)`` once per batch and reads one score per sample."""
    compute_score = load_like_verl({"reward_service_url": live_server.url}, "compute_score_batch")
    before = score_requests(live_server)
    scores = compute_score(
        data_sources=["hh"] * 3,
        solution_strs=COMPLETIONS,
        ground_truths=[None] * 3,
        extra_infos=[{"prompt": p} for p in PROMPTS],
    )
    assert score_requests(live_server) - before == 1
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_verl_items_carry_the_prompt_from_extra_info():
    chat = ({"role": "user", "content": "hi", "extra": 1},)  # a sequence of messages, as parquet gives them back
    assert verl.make_item("yo", {"prompt": chat}, "prompt") == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    assert verl.make_item("yo", {"question": "q "}, "question") == {"prompt": "q ", "response": "yo"}
    assert verl.make_item("yo", {"question": "q "}, "prompt") == {"text": "yo"}
    assert verl.make_item("yo", None, "prompt") == {"text": "yo"}


def test_verl_prompt_key_and_url_from_the_environment(live_server: ServerProcess, monkeypatch):
    want = direct_scores(live_server, [{"text": "four"}, {"prompt": "say hello to the user. ", "response": "four"}])
    monkeypatch.setenv(verl.URL_ENV, live_server.url)  # the URL from the environment when reward_kwargs lack it
    got = verl.compute_score_batch(
        solution_strs=["four"] * 2, extra_infos=[None, {"question": "say hello to the user. "}], prompt_key="question"
    )
    assert got == pytest.approx(want, abs=BATCH_NEIGHBOURS)
    assert got[0] != pytest.approx(got[1], abs=BATCH_NEIGHBOURS)  # the prompt really was sent
    monkeypatch.delenv(verl.URL_ENV)
    with pytest.raises(ValueError, match="reward_service_url"):
        verl.compute_score(solution_str="four")
