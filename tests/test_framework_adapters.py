"""The RL-framework adapters of the client package against a real server: TRL's reward function (under each TRL's
way of telling async functions apart, in a script and in a notebook) and verl's custom reward functions (per
sample, async, batch), with coalescing."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
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
def trl_1_16_is_async(func) -> bool:
    from trl.trainer.utils import is_async_callable  # the installed TRL: it also looks at func.__call__

    return is_async_callable(func)


# How each TRL the docs name tells an async reward function apart (GRPOTrainer and RLOOTrainer alike):
TRL_ASYNC_CHECKS = {
    "trl-0.24": lambda func: False,  # no async support: every reward function is called synchronously
    "trl-1.0-1.9": inspect.iscoroutinefunction,  # False for an instance, whatever its __call__
    "trl-1.16": trl_1_16_is_async,
}


@pytest.fixture(scope="module")
def trl_async_loop():
    """TRL's daemon event loop for async reward functions (``start_event_loop_in_daemon``, TRL 1.0 on)."""
    from trl.trainer.utils import start_event_loop_in_daemon

    thread, loop, ready = start_event_loop_in_daemon(name="trl-async-rewards")
    ready.wait()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def trl_calculate_rewards(is_async, reward_func, async_loop) -> list[float]:
    """One custom reward function through ``GRPOTrainer._calculate_rewards`` as TRL 1.0-1.16 write it
    (trl/trainer/grpo_trainer.py; TRL 0.24 is the synchronous branch alone): an async function is awaited in a
    coroutine on TRL's daemon loop, ``asyncio.run_coroutine_threadsafe(...).result()``; any other is called on the
    training thread and its output iterated (``[r if r is not None else torch.nan for r in output]``) into a
    tensor."""
    import torch

    reward_kwargs = {"ground_truth": ["4", "hi", "4"], "trainer_state": None}
    if is_async(reward_func):

        async def invoke():
            output = await reward_func(
                prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, **reward_kwargs
            )
            return [r if r is not None else torch.nan for r in output]

        output = asyncio.run_coroutine_threadsafe(invoke(), async_loop).result(timeout=60)
    else:
        output = reward_func(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, **reward_kwargs)
        output = [reward if reward is not None else torch.nan for reward in output]
    return torch.tensor(output, dtype=torch.float32).tolist()


@pytest.mark.parametrize("where", ["script", "notebook"])
@pytest.mark.parametrize("trl", sorted(TRL_ASYNC_CHECKS))
def test_every_trl_gets_the_scores_in_a_script_and_in_a_notebook(
    live_server: ServerProcess, expected: list[float], trl_async_loop, trl: str, where: str
):
    """The same ``RewardFunction`` (no options) under each TRL's convention, called from a plain thread (a script)
    and from a thread whose event loop is running (a notebook cell). TRL 1.0-1.9 in a notebook is the case that
    failed with "'coroutine' object is not iterable" unless ``blocking=True`` was passed."""
    is_async = TRL_ASYNC_CHECKS[trl]
    reward = RewardFunction(live_server.url)
    assert is_async(reward) == (trl == "trl-1.16")

    def training_step() -> list[float]:
        return trl_calculate_rewards(is_async, reward, trl_async_loop)

    if where == "script":
        scores = training_step()
    else:

        async def notebook_cell() -> list[float]:
            return training_step()  # the cell's code is synchronous; its thread runs the notebook's event loop

        scores = asyncio.run(notebook_cell())
    assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_a_call_from_a_coroutine_can_be_awaited_or_read(live_server: ServerProcess, expected: list[float]):
    """Outside TRL: from a coroutine, ``reward(...)`` is awaitable (scored on the caller's loop, as TRL 1.16 awaits
    it) and also readable as a list (scored on a background loop); a plain call returns the list; sync calls from
    other threads work too (TRL's experimental async GRPO runs sync reward functions via ``asyncio.to_thread``)."""
    reward = RewardFunction(live_server.url)
    assert reward(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(expected, abs=BATCH_NEIGHBOURS)

    async def from_a_coroutine():
        awaited = await reward(prompts=PROMPTS, completions=COMPLETIONS)
        gathered = await asyncio.gather(
            reward(prompts=PROMPTS, completions=COMPLETIONS), reward.ascore(PROMPTS, COMPLETIONS)
        )
        read = list(reward(prompts=PROMPTS, completions=COMPLETIONS))
        in_thread = await asyncio.to_thread(reward, prompts=PROMPTS, completions=COMPLETIONS)
        return [awaited, *gathered, read, in_thread]

    for scores in asyncio.run(from_a_coroutine()):
        assert scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


def test_blocking_reward_function_returns_scores_even_inside_an_event_loop(
    live_server: ServerProcess, expected: list[float]
):
    """``blocking=True``: a plain function to every TRL (``__call__`` is not a coroutine function), and every call
    returns the list."""
    from trl.trainer.utils import is_async_callable

    reward = RewardFunction(live_server.url, blocking=True)
    assert not is_async_callable(reward) and not inspect.iscoroutinefunction(reward)

    async def notebook_cell():
        return reward(prompts=PROMPTS, completions=COMPLETIONS)

    scores = asyncio.run(notebook_cell())
    assert isinstance(scores, list) and scores == pytest.approx(expected, abs=BATCH_NEIGHBOURS)


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
