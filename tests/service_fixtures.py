"""Fixtures and helpers for the service tests: tiny checkpoints built in-process, and a real server subprocess.

Test modules import the fixture functions they use (``from service_fixtures import ...``); nothing here downloads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

WORDS = ["the", "a", "an", "is", "are", "was", "were", "be", "to", "of", "and", "or", "not", "no", "yes", "in", "on", "at", "for", "with", "this", "that", "it", "you", "i", "we", "they", "he", "she", "good", "bad", "great", "terrible", "helpful", "harmful", "answer", "question", "please", "thanks", "sorry", "sure", "here", "there", "what", "why", "how", "two", "four", "five", "plus", "equals", "math", "cat", "dog", "sky", "blue", "red", "green", "hello", "world", "user", "assistant", "system", "short", "long", "text"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789+=?!.,:;'-")
NORMALIZATION = {"mean": 0.25, "std": 2.0}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def build_tiny_tokenizer(chat_template: str | None = None):
    """A WordPiece tokenizer (BERT-style, lower-cased) over a small word list plus single characters."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_list = specials + WORDS + LETTERS + [f"##{c}" for c in LETTERS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


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
    """A random 2-layer BERT sequence classifier saved as safetensors, with (optionally) a reward manifest."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from training.checkpoint import write_manifest
    from training.formatting import recipe_for

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    if num_labels == 3:
        config.id2label = {0: "hate", 1: "nothate", 2: "neutral"}
        config.label2id = {v: k for k, v in config.id2label.items()}
    config.initializer_range = 0.3  # a wider random init spreads the scores, so comparisons are meaningful
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if manifest:
        recipe = recipe_for(tokenizer, max_length=max_length, truncation_side="left")
        write_manifest(
            path,
            {
                "name": "tiny-bert-reward",
                "base_model": "tiny-random-bert",
                "formatting": recipe.to_dict(),
                "normalization": dict(NORMALIZATION),
                "eval": {},
                "training": {"data_fingerprint": f"test-{seed}"},
            },
        )
    return path


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
class ServerProcess:
    """``python -m service.cli`` on 127.0.0.1 with a free port; its log is kept for assertions."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_lines: list[str] = []
        self.url: str | None = None

    def start(self, ready_timeout: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log}")
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.05)  # polling interval, not synchronisation: the deadline bounds the wait
        self.stop()
        raise RuntimeError(f"server not ready within {ready_timeout} s:\n{self.log}")

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log_lines.append(line.rstrip("\n"))
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if match and self.url is None:
                self.url = f"http://127.0.0.1:{match.group(1)}"

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        if labels:
            found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if any(found.get(k) != v for k, v in labels.items()):
                continue
        total += float(value)
    return total


def json_post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, **kwargs)


@pytest.fixture(scope="module")
def live_server(service_checkpoint: Path) -> Iterator[ServerProcess]:
    """One server per test module; max_wait 20 ms (set through the environment) so concurrent requests batch."""
    server = ServerProcess(
        ["--model", str(service_checkpoint), "--max-batch-size", "32", "--torch-threads", "1"],
        env={"REWARD_MAX_WAIT_MS": "20"},
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
