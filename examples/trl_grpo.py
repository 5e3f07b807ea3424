"""Train a policy with TRL's GRPO against a running reward service.

    make demo                                   # serves the demo reward model on http://127.0.0.1:8000
    python examples/trl_grpo.py --reward-url http://127.0.0.1:8000 --steps 20

By default the policy is a tiny random Llama built in-process (its tokenizer trained on the demo texts), so the
example runs anywhere on a CPU in seconds, without downloads; it shows the wiring, not a useful policy. Pass
``--policy Qwen/Qwen2.5-0.5B-Instruct`` (or any causal LM folder or hub id) to train a real one. The prompts are the
demo data's questions; the reward is the service's score of prompt + completion
(:class:`service.client.RewardFunction`), the same reward whatever TRL version runs it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from service.client import RewardFunction


def demo_prompts() -> list[str]:
    from training import demo_data

    return [question + "\n" for topic in demo_data.TOPICS for question in topic["questions"]]


def tiny_policy(seed: int = 0):
    """A random 2-layer Llama and a byte-level BPE tokenizer trained on the demo texts, built in-process."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training import demo_data

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(demo_data.all_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-url", required=True, nargs="+", help="the reward service (several: replicas)")
    parser.add_argument("--policy", help="a causal LM (hub id or folder); default: a tiny random one, built here")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt (the GRPO group)")
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--normalize", action="store_true", help="ask the service for normalized scores")
    parser.add_argument("--output-dir", default="grpo-output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    if args.policy:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.policy), AutoTokenizer.from_pretrained(args.policy)
    else:
        model, tokenizer = tiny_policy(args.seed)

    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        learning_rate=1e-5 if args.policy else 1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=True if not args.policy else None,
        bf16=False,
        gradient_checkpointing=False,
    )
    reward = RewardFunction(args.reward_url, normalize=args.normalize, name="reward_service")
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": demo_prompts()}),
    )
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    print(f"trained {trainer.state.global_step} steps; mean reward per step: {[round(r, 4) for r in rewards]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
