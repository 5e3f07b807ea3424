"""Fixtures and helpers for the service tests: tiny checkpoints (bench.tiny, built in-process), a real server
subprocess (bench.servers.Server), in-process apps and a controllable backend.

conftest.py registers the fixtures defined here for every test module: a test names them as parameters and imports
only the helpers it calls.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import Server
from bench.tiny import make_tiny_bert

REPO = Path(__file__).resolve().parents[1]

NORMALIZATION = {"mean": 0.25, "std": 2.0}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def build_tiny_bert(
    path: Path,
    *,
    num_labels: int = 1,
    manifest: bool = True,
    max_length: int = 64,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    hidden_size: int = 32,
    layers: int = 2,
) -> Path:
    """The service tests' tiny BERT: a chat template and a hand-written manifest (known normalization) by default;
    a wider random init (0.3) spreads the scores, so comparisons between texts are meaningful."""
    return make_tiny_bert(
        path,
        seed=seed,
        num_labels=num_labels,
        hidden_size=hidden_size,
        layers=layers,
        init_range=0.3,
        chat_template=chat_template,
        max_length=max_length,
        manifest={
            "name": "tiny-bert-reward",
            "base_model": "tiny-random-bert",
            "normalization": dict(NORMALIZATION),
            "training": {"data_fingerprint": f"test-{seed}"},
        }
        if manifest
        else None,
    )


@pytest.fixture(scope="session")
def tiny_reward_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT reward checkpoint with a chat template and a hand-written manifest (known normalization)."""
    return build_tiny_bert(tmp_path_factory.mktemp("service-ckpt") / "tiny-bert")


@pytest.fixture(scope="session")
def service_checkpoint(request: pytest.FixtureRequest) -> Path:
    """A reward checkpoint with a manifest: the one made by reward-train (conftest's ``trained_bert_checkpoint``)
    when that fixture exists, else a tiny random BERT with a hand-written manifest."""
    try:
        return Path(request.getfixturevalue("trained_bert_checkpoint"))
    except pytest.FixtureLookupError:
        return Path(request.getfixturevalue("tiny_reward_checkpoint"))


@pytest.fixture(scope="session")
def plain_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-label classifier folder without a manifest or chat template (labels hate / nothate / neutral)."""
    return build_tiny_bert(
        tmp_path_factory.mktemp("plain-clf") / "clf", num_labels=3, manifest=False, seed=1, chat_template=None
    )


# -- a real server -------------------------------------------------------------------------------------------------
class ServerProcess(Server):
    """``python -m service.cli`` on 127.0.0.1, port 0 (read from its log), one torch thread; ``args`` are its
    further options. :meth:`start` returns once ``/readyz`` answers 200; :attr:`log` holds what it printed."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None):
        argv = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", "0", *args]
        super().__init__("reward-serve", argv, log_path, env={"OMP_NUM_THREADS": "1", **(env or {})}, root=REPO)

    def start(self, ready_timeout: float = 60.0) -> ServerProcess:
        super().start(ready_timeout)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        return super().stop(timeout)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` (with these labels) in a Prometheus text exposition; 0 if absent."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items())
    )


@pytest.fixture(scope="module")
def live_server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    """One server per test module; max_wait 20 ms and a batch window over the whole queue (set through the
    environment) so concurrent requests batch: with the ONNX backend the default is one text per forward."""
    server = ServerProcess(
        ["--model", str(service_checkpoint), "--max-batch-size", "32", "--torch-threads", "1"],
        env={"REWARD_MAX_WAIT_MS": "20", "REWARD_BATCH_WINDOW_ITEMS": "0"},
    ).start()
    yield server
    server.stop()


# -- in-process apps -------------------------------------------------------------------------------------------------
def make_settings(model: Path | str, **overrides: Any):
    from service.settings import ServeSettings

    return ServeSettings(model=str(model), **overrides)


@contextlib.contextmanager
def app_client(settings, backend=None, load_timeout: float = 60.0) -> Iterator[Any]:
    """A TestClient over ``create_app`` (lifespan run), once loading has ended."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings, backend)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.runtime.wait_until_loaded(load_timeout), "model did not load in time"
        yield client


class ThreadedServer:
    """uvicorn serving ``create_app(settings, backend)`` from a thread of this process (real sockets, real
    concurrency, no signal handling): for tests that need fault injection or many concurrent clients."""

    def __init__(self, settings, backend=None):
        import uvicorn

        from service.app import create_app

        self.app = create_app(settings, backend)
        self.runtime = self.app.state.runtime
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.runtime.wait_until_loaded(0.05)):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)  # polling interval; the deadline bounds the wait
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class ControlledBackend:
    """A real checkpoint backend with test controls: a gate that holds forward passes, a poison token that makes a
    forward raise, a gate that holds warm-up, and a record of every batch computed.

    Tests that close the gate serve it with ``inference_workers=1``: the held forward is then the only one, and every
    later item waits in the queue (with two workers the second would take them into a forward of its own)."""

    def __init__(self, checkpoint_dir: Path, poison_word: str = "terrible"):
        from service.backend import CheckpointBackend

        self.real = CheckpointBackend.load(checkpoint_dir, device="cpu")
        self.formatter = self.real.formatter
        self.info = self.real.info
        self.poison = self.formatter.tokenizer.convert_tokens_to_ids(poison_word)
        self.gate = threading.Event()
        self.gate.set()
        self.warm_gate = threading.Event()
        self.warm_gate.set()
        self.in_forward = threading.Event()
        self.batches: list[list[list[int]]] = []

    def warm_up(self) -> None:
        assert self.warm_gate.wait(60)
        self.real.warm_up()

    def forward(self, batch: list[list[int]]) -> list[float]:
        self.in_forward.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.batches.append([list(ids) for ids in batch])
        if any(self.poison in ids for ids in batch):
            raise RuntimeError("injected fault: poison token in the batch")
        return self.real.forward(batch)

    def computed_tokens(self) -> set[int]:
        return {t for batch in self.batches for ids in batch for t in ids}


@pytest.fixture(scope="module")
def backend(tiny_reward_checkpoint: Path) -> ControlledBackend:
    return ControlledBackend(tiny_reward_checkpoint)


@pytest.fixture
def controlled(backend: ControlledBackend):
    """The module's controllable backend, with its gates open and its records cleared for each test."""
    backend.gate.set()
    backend.warm_gate.set()
    backend.in_forward.clear()
    backend.batches.clear()
    yield backend
    backend.gate.set()
    backend.warm_gate.set()
