"""Shared prompt prefixes on decoder reward models (service.prefix, service.shared_forward): every score equals the
text scored alone, and the shared part is demonstrably computed once (tokens computed < tokens scored)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from bench.tiny import make_tiny_decoder
from service.prefix import PrefixCache, plan_groups, read_length
from service.shared_forward import PrefixSharingForward, unavailable
from tests.fixtures.servers import ThreadedServer, make_settings, metric_value
from training.checkpoint import forward_scores, load_checkpoint

TOLERANCE = 1e-5  # the service's tolerance for the same text in another request shape
PROMPT = (
    "\n\nHuman: what is a good answer to a rude reply from a dog in the city? please say why and how"
    "\n\nAssistant: a good answer is helpful polite and on topic\n\nHuman: and a bad one?\n\nAssistant:"
)
COMPLETIONS = [
    " a bad answer is rude wrong vague or off topic",
    " a bad answer is harmful",
    " no",
    " the quick brown fox jumps over the lazy dog",
    " sorry, I do not know what you mean",
    " one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def decoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp(request.param), architecture=request.param, seed=3)


@pytest.fixture(scope="module")
def checkpoint(decoder_dir: Path):
    return load_checkpoint(decoder_dir)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def sharing(request: pytest.FixtureRequest, checkpoint):
    """Makes the prefix-sharing forward on torch, or on the ONNX decoder graph (exported once per model)."""
    steps = None
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
        from service import decoder_session

        steps = decoder_session.load(checkpoint, "test", 1, cache_bytes=0).steps

    def make(cache_bytes: int, model=None) -> PrefixSharingForward:
        return PrefixSharingForward(model or checkpoint, "v", cache_bytes=cache_bytes, steps=steps)

    return make


def encode(checkpoint, texts: list[str]) -> list[list[int]]:
    return [checkpoint.formatter.encode({"text": t}).input_ids for t in texts]


def alone(checkpoint, batch: list[list[int]]) -> list[float]:
    return [forward_scores(checkpoint, [ids])[0] for ids in batch]


def assert_close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    assert worst <= TOLERANCE, f"largest difference {worst:.3g}"


def test_decoders_share_and_encoders_do_not(checkpoint, tiny_reward_checkpoint):
    assert unavailable(checkpoint.model) is None
    bert = load_checkpoint(tiny_reward_checkpoint)
    assert "encoders attend both ways" in unavailable(bert.model)


def test_a_group_scores_as_each_text_alone_and_computes_the_prompt_once(checkpoint, sharing):
    texts = [PROMPT + c for c in COMPLETIONS] + ["hello world", "hello world", PROMPT + COMPLETIONS[0]]
    batch = encode(checkpoint, texts)
    forward = sharing(0)
    assert_close(forward(batch), alone(checkpoint, batch))
    stats = forward.stats()
    prompt = len(encode(checkpoint, [PROMPT])[0]) - 1  # less its eos
    distinct = sum(len(ids) - 1 for ids in {tuple(ids) for ids in batch})  # each read before its eos (pad)
    assert stats.tokens_scored == sum(len(ids) for ids in batch)
    # The prompt once, every distinct completion once, duplicates and the eos never: not every text whole.
    assert stats.tokens_computed <= distinct - (len(COMPLETIONS) - 1) * (prompt - 2)
    assert stats.cache_hits == 0  # the cache is off


def test_a_text_that_is_a_prefix_of_its_siblings_and_eos_endings(checkpoint, sharing):
    eos = checkpoint.formatter.recipe.eos_token_id
    base = encode(checkpoint, [PROMPT + COMPLETIONS[3]])[0]
    batch = [base, base[:-1], base[:-4], base[:-4] + [eos, eos], [eos, eos], [*base[:20], eos, *base[20:]]]
    assert read_length(base, eos) == len(base) - 1  # pad is eos: the head reads the token before it
    forward = sharing(0)
    assert_close(forward(batch), alone(checkpoint, batch))


def test_sharing_is_decided_on_the_ids_after_left_truncation(decoder_dir, sharing):
    short = load_checkpoint(decoder_dir, max_length=24, truncation_side="left")
    encoded = [short.formatter.encode({"text": PROMPT + c}) for c in COMPLETIONS]
    assert all(e.truncated for e in encoded)
    batch = [e.input_ids for e in encoded]
    forward = sharing(1 << 20, short)
    assert_close(forward(batch), alone(short, batch))


def test_messages_items_share_their_common_prefix(checkpoint, sharing):
    history = [
        {"role": "user", "content": "what is a good answer to a rude reply from a dog in the city?"},
        {"role": "assistant", "content": "a good answer is helpful polite and on topic"},
        {"role": "user", "content": "and a bad one? please say why and how"},
    ]
    items = [{"messages": [*history, {"role": "assistant", "content": c}]} for c in COMPLETIONS]
    batch = [checkpoint.formatter.encode(item).input_ids for item in items]
    forward = sharing(0)
    assert_close(forward(batch), alone(checkpoint, batch))
    stats = forward.stats()
    assert stats.tokens_computed < 0.6 * stats.tokens_scored


def test_the_prefix_cache_serves_a_sibling_sent_later_with_the_same_score(checkpoint, sharing):
    first, second, third = encode(checkpoint, [PROMPT + c for c in COMPLETIONS[:3]])
    cached, uncached = sharing(1 << 20), sharing(0)
    scores = [cached([ids])[0] for ids in (first, second, third)]  # one text per request
    assert cached.stats().cache_hits == 2
    assert_close(scores, [uncached([ids])[0] for ids in (first, second, third)])
    assert_close(scores, alone(checkpoint, [first, second, third]))
    assert cached.stats().tokens_computed < uncached.stats().tokens_computed - len(first)
    # The first text's entry was cut down to the prompt its siblings share.
    assert cached.stats().cache_entries == 1
    assert cached.stats().cache_bytes < _kv_bytes(checkpoint, len(first) - 1)


def _kv_bytes(checkpoint, tokens: int) -> int:
    config = checkpoint.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 4


def test_a_cache_under_pressure_evicts_and_stays_within_its_size(checkpoint, sharing):
    prompts = [f"{word} {word} {word} {word}{PROMPT}" for word in ("red", "green", "blue", "yellow", "black")]
    batch = encode(checkpoint, [p + COMPLETIONS[0] for p in prompts])
    capacity = int(_kv_bytes(checkpoint, len(batch[0])) * 1.5)  # about one text's keys and values
    forward = sharing(capacity)
    scores = [forward([ids])[0] for ids in batch]
    stats = forward.stats()
    assert stats.cache_evictions >= len(batch) - 2
    assert 0 < stats.cache_bytes <= capacity
    assert_close(scores, alone(checkpoint, batch))


def test_completions_of_very_different_lengths_one_token_and_a_group_of_one(checkpoint, sharing):
    """Completions packed into one run (ONNX) or padded into one batch (torch) are each read at their own last
    token: a one-token completion next to long ones, a group of one after a cached prompt."""
    long = " and then" * 12
    completions = [" no", long, " a", " sorry I do not know", long + " really", " b"]
    batch = encode(checkpoint, [PROMPT + c for c in completions])
    forward = sharing(1 << 20)
    assert_close(forward(batch), alone(checkpoint, batch))
    lone = encode(checkpoint, [PROMPT + " yes"])  # the prompt is cached: a group of one, one token of its own
    assert_close(forward(lone), alone(checkpoint, lone))
    assert forward.stats().cache_hits >= 1


def test_a_cached_prompt_extended_by_a_longer_shared_prefix(checkpoint, sharing):
    """A group sharing more than a cached prompt computes only the difference, after the cached keys and values."""
    forward = sharing(1 << 20)
    first = encode(checkpoint, [PROMPT + c for c in COMPLETIONS[2:4]])
    forward(first)  # caches the prompt
    computed = forward.stats().tokens_computed
    second = encode(checkpoint, [PROMPT + " a bad answer is" + c for c in (" rude", " wrong and vague")])
    assert_close(forward(second), alone(checkpoint, second))
    assert forward.stats().tokens_computed - computed < len(second[0])  # not even one text whole


@pytest.mark.parametrize("pack_tokens", [1, 24, 256])
def test_onnx_packs_a_groups_completions_into_few_runs(checkpoint, pack_tokens):
    """The ONNX path runs the prompt and as many completions as fit in ``pack_tokens`` in one ONNX Runtime call, each
    completion read at its own last token, whatever the bins."""
    pytest.importorskip("onnxruntime")
    from service import decoder_session

    path = decoder_session.load(checkpoint, "test", 1, cache_bytes=0).steps.path
    steps = decoder_session.OnnxSteps(path, checkpoint.model, 1, pack_tokens=pack_tokens)
    runs = []
    session_run = steps.session.run
    steps.session.run = lambda names, feeds: runs.append(feeds["last"].shape[1]) or session_run(names, feeds)
    batch = encode(checkpoint, [PROMPT + c for c in [*COMPLETIONS, " x"]])
    forward = PrefixSharingForward(checkpoint, "v", cache_bytes=0, steps=steps)
    assert_close(forward(batch), alone(checkpoint, batch))
    assert sum(runs) == len(batch)  # every completion read once
    if pack_tokens == 1:
        assert len(runs) == len(batch)  # one completion a run, the prompt with the first
    elif pack_tokens == 24:
        assert 1 < len(runs) < len(batch)
    else:
        assert len(runs) == 1


def test_packed_inputs_restart_positions_and_hide_other_completions():
    from service.decoder_session import packed_inputs

    positions, mask, last = packed_inputs(past=1, prefix=2, suffixes=[1, 3])
    assert positions.tolist() == [1, 2, 3, 3, 4, 5]
    assert last.tolist() == [2, 5]
    seen = (mask == 0).astype(int).tolist()  # columns: the past, then the row's 6 tokens
    assert seen == [
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 1, 0],
        [1, 1, 1, 0, 1, 1, 1],
    ]


def test_plan_groups_computes_the_fewest_tokens():
    prompt = list(range(100, 140))
    a, b, c = prompt + [1, 2], prompt + [3], prompt + [4, 5, 6]
    other = [7] * 30
    groups = plan_groups([a, other, b, c], min_shared=16, overhead_tokens=16)
    assert [(g.prefix, sorted(g.members)) for g in groups] == [(40, [0, 2, 3]), (0, [1])]
    # A common prefix shorter than min_shared is not worth a group.
    assert plan_groups([[1] * 10 + [2], [1] * 10 + [3]], min_shared=16, overhead_tokens=0)[0].prefix == 0
    # One item whose ids are all another's: the prefix stops one token short, so each has a token to read.
    assert plan_groups([prompt, prompt + [9]], min_shared=16, overhead_tokens=0)[0].prefix == len(prompt) - 1


def test_prefix_cache_finds_the_longest_shared_prefix_and_evicts_least_recently_used():
    cache = PrefixCache(capacity_bytes=100)
    long, short = list(range(64)), list(range(20)) + [999] * 20
    assert cache.put(long, "long", 60) and cache.put(short, "short", 30)
    entry, shared = cache.lookup(list(range(40)) + [5], min_shared=16)
    assert entry.payload == "long" and shared == 40
    assert cache.lookup([5] * 40, min_shared=16) == (None, 0)
    assert cache.put([7] * 32, "new", 30)  # 60 + 30 + 30 > 100: the least recently used ("short") goes
    assert cache.lookup(short, min_shared=32) == (None, 0)
    assert (cache.stats().evictions, cache.stats().bytes) == (1, 90)
    assert not cache.put(list(range(200)), "too big", 101)
    assert PrefixCache(0).lookup(long, min_shared=16) == (None, 0)


def test_cancelling_one_member_of_a_group_leaves_the_others_exact(checkpoint, sharing):
    from service.batching import Batcher, BatchLimits

    forward = sharing(0)
    gate = threading.Event()
    batches: list[list[list[int]]] = []

    def gated(batch: list[list[int]]) -> list[float]:
        assert gate.wait(30)
        batches.append(batch)
        return forward(batch)

    batch = encode(checkpoint, [PROMPT + c for c in COMPLETIONS[:4]])
    limits = BatchLimits(max_batch_tokens=4096, max_wait_s=0.05, group_prefix_tokens=16)

    async def scenario() -> list[list[float]]:
        batcher = Batcher(gated, limits).start()
        try:
            blocker = batcher.submit([[5, 6, 7]])  # holds the worker until the group is queued
            await asyncio.sleep(0)
            futures = [batcher.submit([ids]) for ids in batch]
            futures[1].cancel()
            gate.set()
            await blocker
            return [await f for i, f in enumerate(futures) if i != 1]
        finally:
            batcher.stop(10)

    scores = asyncio.run(scenario())
    kept = [batch[i] for i in (0, 2, 3)]
    assert_close([s[0] for s in scores], alone(checkpoint, kept))
    assert batch[1] not in [ids for b in batches for ids in b]  # the cancelled member was never computed


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_service_shows_sharing_in_info_and_metrics(decoder_dir, backend):
    if backend == "auto":
        pytest.importorskip("onnxruntime")
    settings = make_settings(decoder_dir, device="cpu", backend=backend, inference_workers=1, max_wait_ms=50)
    with ThreadedServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/info").json()
        # auto on a CPU: the ONNX decoder graph with past keys and values
        assert info["batching"]["forward"] == ("torch" if backend == "torch" else "onnx")
        assert info["batching"]["graph"] == (None if backend == "torch" else "decoder-kv")
        assert info["batching"]["prefix_sharing"] == "in each forward and across requests"
        assert info["batching"]["prefix_cache"] == "512 MiB"
        texts = [PROMPT + c for c in COMPLETIONS]
        scores = client.post("/score", json={"items": [{"text": t} for t in texts]}).json()["scores"]
        checkpoint = load_checkpoint(decoder_dir)
        assert_close(scores, alone(checkpoint, encode(checkpoint, texts)))
        metrics = client.get("/metrics").text
        scored = metric_value(metrics, "reward_tokens_scored_total")
        computed = metric_value(metrics, "reward_tokens_computed_total")
        assert scored > 0 and computed < 0.6 * scored  # the prompt was computed once, not six times
        for name in ("hits", "misses", "evictions"):
            assert f"reward_prefix_cache_{name}_total" in metrics
        assert metric_value(metrics, "reward_prefix_cache_bytes") > 0
