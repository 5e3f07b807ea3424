"""Failover: ``RewardClient([a, b])`` from several threads while one replica is killed, drained or still loading.

Every call must be answered exactly once, with all its scores, equal (<= 1e-5) to what a single replica gives. The
replicas are real servers (``python -m service.cli`` subprocesses; the loading one runs in-process, so that a test
can hold its warm-up). Faults are timed by conditions (calls done, requests in flight), never by sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.failover import Attempt, RecordingTransport
from bench.tiny import word_list
from service.client import AsyncRewardClient, RetryPolicy, RewardClient
from tests.fixtures.servers import ServerProcess, ThreadedServer, make_settings, metric_value

pytestmark = pytest.mark.slow  # replicas as subprocesses, killed and drained under load

THREADS = 6
CALLS = 12  # per thread
TEXTS_PER_CALL = 16
TOLERANCE = 1e-5  # request shapes and batch neighbours differ between replicas and runs
WAIT_S = 120  # bound on every condition wait (a hung test fails instead of hanging)
# The tiny models' words, less ControlledBackend's poison word (it would fail a forward pass).
VOCABULARY = [w for w in word_list() if w.isalpha() and w != "terrible"]


def call_texts(thread: int, call: int) -> list[str]:
    """Distinct, deterministic texts of varied lengths for one call."""
    out = []
    for j in range(TEXTS_PER_CALL):
        n = thread * 1000 + call * 100 + j
        out.append(f"{n} " + " ".join(VOCABULARY[(n * 7 + k) % len(VOCABULARY)] for k in range(2 + n % 23)))
    return out


def wait_for_new_request(transport: RecordingTransport, port: int, seen: int) -> None:
    """Until more than ``seen`` requests were sent to the replica on ``port``."""
    with transport.changed:
        assert transport.changed.wait_for(lambda: transport.started[port] > seen, WAIT_S), "no request reached it"


class Load:
    """THREADS threads, each making CALLS ``score`` calls through one client; results and errors by (thread, call).
    With ``pause_at``, every thread stops before that call until :meth:`resume`."""

    def __init__(self, client: RewardClient, pause_at: int | None = None):
        self.client = client
        self.pause_at = pause_at
        self.results: dict[tuple[int, int], list[float]] = {}
        self.errors: dict[tuple[int, int], BaseException] = {}
        self.answers: collections.Counter[tuple[int, int]] = collections.Counter()
        self.done = 0
        self.changed = threading.Condition()
        self._resume = threading.Event()
        self._pool = ThreadPoolExecutor(THREADS)
        self._futures = []

    def start(self) -> Load:
        self._futures = [self._pool.submit(self._worker, t) for t in range(THREADS)]
        return self

    def _worker(self, thread: int) -> None:
        for call in range(CALLS):
            if call == self.pause_at:
                assert self._resume.wait(WAIT_S)
            key = (thread, call)
            try:
                self.results[key] = self.client.score(call_texts(thread, call)).scores
            except Exception as exc:  # recorded, asserted on by the test
                self.errors[key] = exc
            with self.changed:
                self.answers[key] += 1
                self.done += 1
                self.changed.notify_all()

    def wait_done(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.done >= n, WAIT_S), f"{self.done} of {n} calls done"

    def resume(self) -> None:
        self._resume.set()

    def join(self) -> None:
        for future in self._futures:
            future.result(WAIT_S)
        self._pool.shutdown()


def assert_every_call_answered_once(load: Load, reference: dict[str, float]) -> None:
    assert not load.errors, {k: repr(v) for k, v in list(load.errors.items())[:3]}
    keys = [(t, c) for t in range(THREADS) for c in range(CALLS)]
    assert sorted(load.results) == keys
    assert all(load.answers[k] == 1 for k in keys)
    for (thread, call), scores in load.results.items():
        expected = [reference[text] for text in call_texts(thread, call)]
        assert scores == pytest.approx(expected, abs=TOLERANCE), (thread, call)


def port_of(url: str) -> int:
    port = httpx.URL(url).port
    assert port is not None
    return port


def replica_args(checkpoint: Path, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--torch-threads", "1", *extra]


@pytest.fixture(scope="module")
def survivor(tiny_reward_checkpoint: Path) -> Iterator[ServerProcess]:
    """Replica B: stays up through every test of the module."""
    server = ServerProcess(replica_args(tiny_reward_checkpoint)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(survivor: ServerProcess) -> dict[str, float]:
    """Every text's score from one replica alone, before any fault."""
    texts = [text for t in range(THREADS) for c in range(CALLS) for text in call_texts(t, c)]
    with RewardClient(survivor.url, max_items_per_request=256) as client:
        scores = client.score(texts).scores
    return dict(zip(texts, scores, strict=True))


def failover_client(urls: list[str], transport: RecordingTransport) -> RewardClient:
    return RewardClient(urls, transport=transport, timeout=60, retry=RetryPolicy(max_retries=4, backoff_s=0.05))


def test_sigkill_of_a_replica_mid_load_loses_no_call(tiny_reward_checkpoint, survivor, reference):
    victim = ServerProcess(replica_args(tiny_reward_checkpoint)).start()
    transport = RecordingTransport()
    try:
        with failover_client([victim.url, survivor.url], transport) as client:
            load = Load(client).start()
            load.wait_done(THREADS * CALLS // 6)
            # Freeze the victim, wait for a request sent after that (it cannot be answered), then kill the victim:
            # that request dies in flight.
            with transport.changed:
                os.kill(victim.proc.pid, signal.SIGSTOP)
                seen = transport.started[port_of(victim.url)]
            wait_for_new_request(transport, port_of(victim.url), seen)
            killed_at = time.monotonic()
            victim.proc.kill()
            assert victim.wait(30) == -signal.SIGKILL
            load.join()
    finally:
        victim.stop()
    assert_every_call_answered_once(load, reference)
    at_victim = transport.at(port_of(victim.url))
    assert any(a.started < killed_at and isinstance(a.outcome, str) for a in at_victim)  # cut off in flight
    assert all(isinstance(a.outcome, str) for a in at_victim if a.started > killed_at)  # never answered again


def test_sigterm_drains_in_flight_calls_and_the_rest_go_to_the_other(tiny_reward_checkpoint, survivor, reference):
    # A long batching wait holds each request in the leaving replica for a second: it is still owed when SIGTERM comes.
    leaving = ServerProcess(
        replica_args(
            tiny_reward_checkpoint,
            *("--max-wait-ms", "1000", "--batch-window-items", "0"),  # batches wait (also on an unpadded backend)
            *("--max-batch-size", "1024", "--max-batch-tokens", "65536"),
            *("--drain-timeout-s", "30"),
        )
    ).start()
    transport = RecordingTransport()
    try:
        with failover_client([leaving.url, survivor.url], transport) as client:
            load = Load(client).start()
            with httpx.Client(base_url=leaving.url, timeout=10) as probe:
                deadline = time.monotonic() + WAIT_S
                while metric_value(probe.get("/metrics").text, "reward_requests_in_flight") < 1:
                    assert time.monotonic() < deadline, "no request reached the leaving replica"
                    time.sleep(0.01)  # polling interval; the deadline bounds the wait
            leaving.terminate()
            signalled_at = time.monotonic()
            load.join()
            exit_code = leaving.wait(60)
    finally:
        leaving.stop()
    assert_every_call_answered_once(load, reference)
    assert exit_code == 0, leaving.log[-3000:]
    draining = re.search(r"received SIGTERM: draining (\d+) accepted request", leaving.log)
    assert draining and int(draining.group(1)) >= 1, leaving.log[-3000:]
    at_leaving = transport.at(port_of(leaving.url))
    finished = [a for a in at_leaving if a.started < signalled_at < a.ended and a.outcome == 200]
    assert finished, at_leaving  # accepted before the signal, answered by the leaving replica itself
    # After the signal: answered (accepted just before it took effect), 503 while draining, or a transport error
    # once it is gone (refused, or a kept-alive connection it closed); never another error status.
    after = {a.outcome for a in at_leaving if a.started > signalled_at and isinstance(a.outcome, int)}
    assert after <= {200, 503}, after


def test_a_replica_still_loading_sends_calls_to_the_other_until_it_is_ready(
    tiny_reward_checkpoint,
    controlled,
    survivor,
    reference,
):
    controlled.warm_gate.clear()  # the in-process replica stays in its loading phase until the test opens this
    loading = ThreadedServer(make_settings(tiny_reward_checkpoint, torch_threads=1), controlled)
    loading.thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not loading.server.started:
            assert time.monotonic() < deadline and loading.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.01)  # polling interval; the deadline bounds the wait
        url = f"http://127.0.0.1:{loading.server.servers[0].sockets[0].getsockname()[1]}"
        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["phase"] == "loading"

        transport = RecordingTransport()
        with failover_client([url, survivor.url], transport) as client:
            load = Load(client, pause_at=CALLS // 2).start()
            load.wait_done(THREADS * CALLS // 2)  # every thread parked half-way, all of it answered by the other
            loaded_from = time.monotonic()
            controlled.warm_gate.set()
            assert loading.runtime.wait_until_loaded(WAIT_S) and loading.runtime.lifecycle.ready
            load.resume()
            load.join()
    finally:
        controlled.warm_gate.set()
        loading.server.should_exit = True
        loading.thread.join(30)

    assert_every_call_answered_once(load, reference)
    at_loading = transport.at(port_of(url))
    refused = [a for a in at_loading if a.started < loaded_from]
    assert refused and {a.outcome for a in refused} == {503}
    # Each 503 ("still loading", Retry-After: 5) was followed at once by the same request on the other replica:
    # a Retry-After is about the replica that sent it.
    by_thread: dict[int, list[Attempt]] = collections.defaultdict(list)
    for attempt in sorted(transport.attempts, key=lambda a: a.started):
        by_thread[attempt.thread].append(attempt)
    for attempts in by_thread.values():
        for this, following in itertools.pairwise(attempts):
            if this.port == port_of(url) and this.outcome == 503:
                assert following.port == port_of(survivor.url) and following.started - this.ended < 2.5
    assert any(a.outcome == 200 for a in at_loading if a.started > loaded_from)  # once ready, it takes its share


# -- the rule the client follows, without servers ---------------------------------------------------------------------
def statuses(*codes: int) -> Callable[[httpx.Request], httpx.Response]:
    by_host = dict(zip(("a", "b"), codes, strict=True))

    def handler(request: httpx.Request) -> httpx.Response:
        code = by_host[request.url.host]
        if code != 200:
            return httpx.Response(code, headers={"Retry-After": "7"}, json={"detail": "busy"})
        return httpx.Response(200, json={"scores": [1.0], "truncated": [False], "model": "m", "model_version": "v"})

    return handler


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_waited_only_once_every_replica_was_tried(code, monkeypatch):
    import service.client as client_module

    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    policy = RetryPolicy(max_retries=2)
    with RewardClient(["http://a", "http://b"], transport=httpx.MockTransport(statuses(code, 200)), retry=policy) as c:
        for _ in range(4):  # round robin: calls start on a and on b
            assert c.score(["x"]).scores == [1.0]
    assert waits == [0.0, 0.0]  # a refused twice; each time b was asked at once
    both_busy = httpx.MockTransport(statuses(code, code))
    with RewardClient(["http://a", "http://b"], transport=both_busy, retry=policy) as c:
        waits.clear()
        with pytest.raises(Exception, match=str(code)):
            c.score(["x"])
    assert waits == [0.0, 7.0]  # b at once, then a again after a's Retry-After
    one_service = httpx.MockTransport(statuses(code, 200))
    with RewardClient(["http://a", "http://a"], transport=one_service, retry=policy) as c:  # one URL, given twice
        waits.clear()
        with pytest.raises(Exception, match=str(code)):
            c.score(["x"])
    assert waits == [7.0, 7.0]  # the same replica: its Retry-After holds


def test_async_client_moves_to_the_other_replica_at_once(monkeypatch):
    import service.client as client_module

    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)

    async def main() -> None:
        transport = httpx.MockTransport(statuses(503, 200))
        async with AsyncRewardClient(["http://a", "http://b"], transport=transport) as c:
            for _ in range(4):
                assert (await c.score(["x"])).scores == [1.0]

    monkeypatch.setattr(client_module.asyncio, "sleep", record)
    try:
        asyncio.run(main())
    finally:
        monkeypatch.undo()
    assert waits == [0.0, 0.0]
