"""End to end: ``reward-serve`` as a subprocess on 127.0.0.1 serving a checkpoint made by ``reward-train``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import ServerProcess, metric_value

pytestmark = pytest.mark.slow  # a reward-train run, then reward-serve as a subprocess

PROMPT = "what is two plus two? "
ANSWERS = ["four", "five i think", "it is four, thanks for asking", "a dog"]


@pytest.fixture(scope="module")
def direct(trained_bert_checkpoint: Path):
    from training.checkpoint import load_checkpoint

    return load_checkpoint(trained_bert_checkpoint, device="cpu")


def post(server: ServerProcess, route: str, body: dict) -> dict:
    response = httpx.post(server.url + route, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_startup_logs_say_what_was_loaded_and_how(live_server: ServerProcess, trained_bert_checkpoint: Path):
    log = live_server.log
    assert "loaded reward model" in log and str(trained_bert_checkpoint.resolve()) in log
    assert "device cpu, dtype float32" in log
    assert "max_batch_tokens 1024, max_batch_size 32, max_wait 20.0 ms" in log  # the float32-on-CPU default
    info = httpx.get(live_server.url + "/info").json()
    assert info["has_manifest"] is True and info["batching"]["max_wait_ms"] == 20  # from REWARD_MAX_WAIT_MS


def test_served_scores_equal_the_checkpoint_loaded_directly(live_server: ServerProcess, direct):
    from training.checkpoint import forward_scores

    items = [{"prompt": PROMPT, "response": a} for a in ANSWERS] + [{"text": PROMPT + ANSWERS[0]}]
    body = post(live_server, "/score", {"items": items})
    expected = [forward_scores(direct, [direct.formatter.encode(i).input_ids])[0] for i in items]
    assert body["scores"] == pytest.approx(expected, abs=1e-4)  # batched vs alone: neighbours
    assert body["scores"][0] == pytest.approx(body["scores"][-1], abs=1e-5)  # text == prompt + response


def test_scores_do_not_depend_on_batch_neighbours(live_server: ServerProcess):
    target = {"prompt": PROMPT, "response": "four"}
    alone = post(live_server, "/score", {"items": [target]})["scores"][0]
    long_neighbours = [
        {"text": f"neighbour {i}: " + "the quick brown fox jumps over the lazy dog " * 6} for i in range(31)
    ]
    mixed = post(live_server, "/score", {"items": long_neighbours[:15] + [target] + long_neighbours[15:]})
    assert mixed["scores"][15] == pytest.approx(alone, abs=1e-4)


def test_compare_get_reward_and_normalize_agree_with_score(live_server: ServerProcess, direct):
    scores = post(live_server, "/score", {"items": [{"prompt": PROMPT, "response": a} for a in ANSWERS]})["scores"]
    pairs = [
        {"prompt": PROMPT, "chosen": ANSWERS[0], "rejected": ANSWERS[1]},
        {"prompt": PROMPT, "chosen": ANSWERS[2], "rejected": ANSWERS[3]},
    ]
    compare = post(live_server, "/compare", {"pairs": pairs})
    assert compare["margins"] == pytest.approx([scores[0] - scores[1], scores[2] - scores[3]], abs=2e-5)
    rewards = post(live_server, "/get_reward", {"query": [PROMPT + a for a in ANSWERS], "prompts": [PROMPT] * 4})
    assert rewards["rewards"] == pytest.approx(scores, abs=1e-5)
    if direct.normalization:
        mean, std = direct.normalization["mean"], direct.normalization["std"] or 1.0
        normalized = post(
            live_server, "/score", {"items": [{"prompt": PROMPT, "response": ANSWERS[0]}], "normalize": True}
        )
        assert normalized["scores"][0] == pytest.approx((scores[0] - mean) / std, abs=1e-4 / std)  # alone vs in 4


def test_64_concurrent_single_item_requests_share_forward_passes(live_server: ServerProcess):
    url = live_server.url
    before = httpx.get(url + "/metrics").text

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            requests = [
                client.post(url + "/score", json={"items": [{"prompt": PROMPT, "response": f"answer number {i}"}]})
                for i in range(64)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 64
    after = httpx.get(url + "/metrics").text
    forwards = metric_value(after, "reward_batch_size_count") - metric_value(before, "reward_batch_size_count")
    items = metric_value(after, "reward_batch_size_sum") - metric_value(before, "reward_batch_size_sum")
    single = metric_value(after, "reward_batch_size_bucket", {"le": "1.0"}) - metric_value(
        before, "reward_batch_size_bucket", {"le": "1.0"}
    )
    assert items == 64 and forwards < 64 and single < forwards, (forwards, single)
    padded = metric_value(after, "reward_batch_tokens_sum")
    real = metric_value(after, "reward_batch_real_tokens_sum")
    assert 0 < real <= padded
    print(
        f"\n64 concurrent requests: {forwards:.0f} forwards, {items / forwards:.1f} items/forward, "
        f"padding efficiency {real / padded:.2f}"
    )


def test_the_clients_score_and_compare_against_the_live_server(live_server: ServerProcess):
    from service.client import AsyncRewardClient, RewardClient

    items = [{"prompt": PROMPT, "response": a} for a in ANSWERS] + ["plain text is a text item"]
    expected = post(live_server, "/score", {"items": [i if isinstance(i, dict) else {"text": i} for i in items]})
    with RewardClient([live_server.url, live_server.url], max_items_per_request=2) as client:  # 3 shards
        scored = client.score(items)
        assert scored.scores == pytest.approx(expected["scores"], abs=1e-4)  # sharded: other batch neighbours
        assert scored.model_version == expected["model_version"] and len(scored.truncated) == 5
        comparison = client.compare([{"prompt": PROMPT, "chosen": ANSWERS[0], "rejected": ANSWERS[1]}])
        assert comparison.margins[0] == pytest.approx(expected["scores"][0] - expected["scores"][1], abs=2e-4)

    async def main():
        async with AsyncRewardClient(live_server.url) as client:
            return await client.score(items)

    assert asyncio.run(main()).scores == pytest.approx(expected["scores"], abs=1e-5)


def test_a_grpo_run_gets_its_rewards_from_the_live_server(live_server: ServerProcess, tmp_path: Path):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from bench import tiny
    from service.client import RewardFunction

    tokenizer = tiny.make_llama_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    dataset = Dataset.from_dict(
        {
            "prompt": ["what is two plus two?", "say something kind", "name a colour", "hello world"],
            "topic": ["math", "chat", "colour", "chat"],  # an extra column: arrives in kwargs, must not be sent
        }
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    before = metric_value(
        httpx.get(live_server.url + "/metrics").text, "reward_requests_total", {"route": "/score", "code": "200"}
    )
    reward = RewardFunction(live_server.url, name="served_rm")
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    after = metric_value(
        httpx.get(live_server.url + "/metrics").text, "reward_requests_total", {"route": "/score", "code": "200"}
    )
    assert after > before
    logged = [entry for entry in trainer.state.log_history if "rewards/served_rm/mean" in entry]
    assert logged and all(isinstance(e["rewards/served_rm/mean"], float) for e in logged)
