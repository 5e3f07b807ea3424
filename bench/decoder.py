"""Random-weight decoder reward models of real shapes and GRPO-shaped texts, for timing the decoder paths.

Speed does not depend on weight values, so a decoder is timed as a random model of a real shape (``SHAPES``) with a
byte-level BPE tokenizer trained in-process on the preference data's transcripts. GRPO-shaped texts
(:func:`grpo_groups`): each prompt is an hh-rlhf transcript up to its last ``"\\n\\nAssistant:"``, followed by G
completions: the pair's own chosen and rejected replies and G - 2 replies of other pairs.

    python -m bench.decoder [--data hh-rlhf.jsonl] [--shape smollm2-135m] [--groups 4] [--repeats 3]

times, in one process and interleaved (A B C A B C ...), one worker's forward (one thread) on the same groups:
``onnx-shared`` (the ONNX Runtime decoder graph with past keys and values: each group's prompt once, its
completions packed into rows of up to 256 tokens), ``onnx-unpacked`` (the same graph, one completion per session
run), ``torch-shared`` (the same on torch, completions padded together), ``onnx`` (the ONNX Runtime full graph, one
text per forward) and ``torch`` (the group padded, every text whole). ``--unshared`` regroups the same texts so
that nothing is shared.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.texts import add_data_arguments, load_rows

SEPARATOR = "\n\nAssistant:"
MAX_LENGTH = 2048  # the manifest's truncation length

SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M's config.json
    "smollm2-135m": {
        "architecture": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
    },
    # Qwen/Qwen2.5-0.5B's config.json (biases on the query, key and value projections)
    "qwen2.5-0.5b": {
        "architecture": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
    },
    # The same code path in seconds, for smoke runs (head size 64: vLLM's CPU attention has kernels for the usual
    # head sizes only).
    "tiny": {
        "architecture": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
}


def grpo_groups(rows: Sequence[dict[str, Any]], *, groups: int, per_group: int = 8, seed: int = 0) -> list[list[dict]]:
    """``groups`` lists of ``per_group`` ``{"text"}`` items sharing a prompt: the pair's own chosen and rejected
    replies and ``per_group - 2`` replies of other pairs. The prompt is a row's ``prompt`` (TRL's explicit-prompt
    rows), or for transcripts everything up to the last ``"\\n\\nAssistant:"`` that chosen and rejected share."""
    prompts = []
    for row in rows:
        chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            continue
        if isinstance(prompt, str):
            prompts.append((prompt, chosen, rejected))
            continue
        cut = chosen.rfind(SEPARATOR) + len(SEPARATOR)
        if cut < len(SEPARATOR) or rejected[:cut] != chosen[:cut]:
            continue
        prompts.append((chosen[:cut], chosen[cut:], rejected[cut:]))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    replies = [reply for _, chosen, rejected in prompts for reply in (chosen, rejected)]
    out = []
    for prompt, chosen, rejected in prompts[:groups]:
        others = rng.sample(replies, per_group - 2)
        out.append([{"text": prompt + reply} for reply in [chosen, rejected, *others]])
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int = 16384):
    """A byte-level BPE tokenizer trained on ``texts``, ``<s>`` before every text, ``</s>`` as eos (and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_LENGTH
    )


def make_decoder(directory: str | Path, shape: str, rows: Sequence[dict[str, Any]], *, seed: int = 0) -> Path:
    """A random-weight sequence classifier of ``shape`` with a tokenizer trained on the transcripts of ``rows``,
    saved to ``directory`` with a manifest (max_length :data:`MAX_LENGTH`, left truncation)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    from training.checkpoint import write_manifest
    from training.formatting import recipe_for

    directory = Path(directory)
    spec = dict(SHAPES[shape])
    architecture = spec.pop("architecture")
    texts = [side for row in rows for side in (row.get("chosen"), row.get("rejected")) if isinstance(side, str)]
    tokenizer = train_tokenizer(texts)
    tokenizer.pad_token = tokenizer.eos_token
    common = {
        **spec,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "num_labels": 1,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**common))
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(**common))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    recipe = recipe_for(tokenizer, max_length=MAX_LENGTH, truncation_side="left")
    write_manifest(
        directory,
        {
            "name": f"random-{shape}-reward",
            "base_model": f"random weights, {shape} shape (bench.decoder)",
            "formatting": recipe.to_dict(),
            "normalization": None,
            "eval": {},
            "training": {"data_fingerprint": f"none: random weights, seed {seed}"},
        },
    )
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--checkpoint", type=Path, default=None, help="reuse a folder made by an earlier run")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default="onnx-shared,torch-shared,onnx,torch")
    add_data_arguments(parser)
    parser.add_argument(
        "--unshared",
        action="store_true",
        help="regroup the texts so that no two of a group share a prompt: the cost of the paths when nothing is shared",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one inference worker's share on the 2-core default plan
    from service.shared_forward import PrefixSharingForward
    from training.checkpoint import forward_scores, load_checkpoint

    rows, source = load_rows(args.data, data_dir=args.data_dir, split=args.split)
    print(f"texts from {source}", flush=True)
    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix=f"bench-{args.shape}-"))
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        make_decoder(folder, args.shape, rows)
        print(f"built {args.shape} in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    checkpoint = load_checkpoint(folder)
    groups = [
        [checkpoint.formatter.encode(item).input_ids for item in group]
        for group in grpo_groups(rows, groups=args.groups, per_group=args.per_group)
    ]
    if args.unshared:  # group k takes the k-th text of every prompt: the same texts, nothing shared
        groups = [[group[k] for group in groups] for k in range(len(groups[0]))]
    tokens = sum(len(ids) for group in groups for ids in group)
    texts = sum(len(group) for group in groups)
    print(f"{texts} texts in {len(groups)} groups, {tokens / texts:.0f} tokens per text", flush=True)

    shared = PrefixSharingForward(checkpoint, "bench", cache_bytes=0)
    paths: dict[str, Any] = {
        "torch-shared": lambda group: shared(group),
        "torch": lambda group: forward_scores(checkpoint, group),
    }
    wanted = args.paths.split(",")
    if "onnx" in wanted:
        from service import onnx_session

        started = time.perf_counter()
        runner = onnx_session.load(checkpoint, "bench", 1)
        print(f"ONNX graph ready in {time.perf_counter() - started:.0f} s ({runner.graph})", flush=True)
        paths["onnx"] = runner
    if "onnx-shared" in wanted:
        from service import decoder_session

        started = time.perf_counter()
        paths["onnx-shared"] = decoder_session.load(checkpoint, "bench", 1, cache_bytes=0)
        print(f"ONNX decoder graph ready in {time.perf_counter() - started:.0f} s", flush=True)
    if "onnx-unpacked" in wanted:
        from service import decoder_session

        path = decoder_session.load(checkpoint, "bench", 1, cache_bytes=0).steps.path
        steps = decoder_session.OnnxSteps(path, checkpoint.model, 1, pack_tokens=1)
        paths["onnx-unpacked"] = PrefixSharingForward(checkpoint, "bench", cache_bytes=0, steps=steps)
    reference = [forward_scores(checkpoint, [ids])[0] for ids in groups[0]]
    for name in wanted:
        worst = max(abs(a - b) for a, b in zip(paths[name](groups[0]), reference, strict=True))
        print(f"{name}: first group within {worst:.2g} of each text scored alone", flush=True)
    # Interleaved group by group (A B C, then B C A, ...), so that the machine's drift and others' load fall on
    # every path alike within seconds.
    timings: dict[str, list[float]] = {name: [] for name in wanted}
    for repeat in range(args.repeats):
        seconds = dict.fromkeys(wanted, 0.0)
        for index, group in enumerate(groups):
            shift = (repeat * len(groups) + index) % len(wanted)
            for name in wanted[shift:] + wanted[:shift]:
                started = time.perf_counter()
                paths[name](group)
                seconds[name] += time.perf_counter() - started
        for name in wanted:
            timings[name].append(texts / seconds[name])
        print("  ".join(f"{name}: {timings[name][-1]:.2f} texts/s" for name in wanted), flush=True)
    reference_path = "onnx" if "onnx" in wanted else wanted[-1]  # the forward a decoder got before sharing
    base = statistics.median(timings[reference_path])
    for name in wanted:
        runs = ", ".join(f"{x:.2f}" for x in timings[name])
        median = statistics.median(timings[name])
        print(f"{name:13s} median {median:.2f} texts/s ({runs}); {median / base:.2f}x {reference_path}")
    stats = shared.stats()
    if stats.tokens_scored:
        print(f"torch-shared computed {stats.tokens_computed / stats.tokens_scored:.2f} of the tokens scored")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
