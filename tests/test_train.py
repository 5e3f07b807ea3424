"""``reward-train`` end to end on tiny models: checkpoint, manifest, the formatting contract, bad input.

Plus the embedded demo data generator it trains on by default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.fixtures.commands import reward_train_argv, run_module, write_jsonl
from training import demo_data
from training.checkpoint import MANIFEST_NAME, forward_scores, load_checkpoint, read_manifest
from training.data import fingerprint
from training.evaluate import evaluate_pairs

MAX_LENGTH = 32
EVAL_RATIO = 0.25


def run_train(argv):
    """``reward-train`` in-process, returning its TrainResult (trainer included)."""
    from training.train import make_parser, train

    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return train(script_args, training_args, model_args)


def mixed_length_rows() -> list[dict]:
    """20 pairs, some with a side longer than MAX_LENGTH tokens and most without."""
    rows = []
    for i, topic in enumerate(demo_data.TOPICS[:20]):
        rows.append(
            {
                "prompt": topic["questions"][0] + "\n",
                "chosen": " ".join(topic["good"]) if i % 3 == 0 else topic["good"][0],
                "rejected": " ".join(topic["wrong"]) if i % 4 == 1 else topic["wrong"][0],
            }
        )
    return rows


def too_long(tokenizer, row, side) -> bool:
    return len(tokenizer(row["prompt"] + row[side])["input_ids"]) > MAX_LENGTH


def trainer_rewards(trainer, n):
    """Rewards the trained model gives the first ``n`` training pairs, on the trainer's own collated batch."""
    import torch

    features = [trainer.train_dataset[i] for i in range(n)]
    batch = trainer.data_collator(features)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
        ).logits.squeeze(-1)
    chosen, rejected = logits[:n].tolist(), logits[n:].tolist()
    return chosen, rejected, features


@pytest.fixture(scope="module")
def bert_rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", mixed_length_rows())


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_bert_dir, bert_rows_file):
    out = tmp_path_factory.mktemp("bert-run") / "checkpoint"
    return run_train(reward_train_argv(tiny_bert_dir, bert_rows_file, out))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir):
    rows = demo_data.to_conversational(demo_data.generate_pairs(16, seed=4))
    data = write_jsonl(tmp_path_factory.mktemp("conv") / "conv.jsonl", rows)
    out = tmp_path_factory.mktemp("llama-run") / "checkpoint"
    argv = reward_train_argv(tiny_llama_dir, data, out)
    argv[argv.index("--max_length") + 1] = "256"  # no truncation: ids must equal the full template
    return run_train(argv)


# -- the checkpoint -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_checkpoint_files_and_config(bert_run, tiny_bert_dir):
    out = bert_run.output_dir
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MANIFEST_NAME,
        "README.md",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 1  # num_labels == 1: one reward output
    assert config["pad_token_id"] == 0  # [PAD]
    assert not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*"))  # safetensors only, no step folders


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_manifest_is_complete(bert_run, tiny_bert_dir):
    manifest = read_manifest(bert_run.output_dir)
    assert manifest == json.loads(json.dumps(bert_run.manifest | {"format_version": 1}))
    assert manifest["format_version"] == 1
    assert manifest["base_model"] == str(tiny_bert_dir)
    fmt = manifest["formatting"]
    assert fmt["max_length"] == MAX_LENGTH and fmt["architecture"] == "encoder" and fmt["truncation_side"] == "left"
    assert fmt["append_eos"] is False and fmt["pad_token_id"] == 0
    norm = manifest["normalization"]
    assert isinstance(norm["mean"], float) and norm["std"] > 0
    ev = manifest["eval"]
    assert ev["n"] == 5 and 0.0 <= ev["accuracy"] <= 1.0
    assert isinstance(ev["mean_margin"], float) and isinstance(ev["truncated"], int)
    training = manifest["training"]
    assert training["arguments"]["training"]["max_steps"] == 2
    assert training["arguments"]["script"]["eval_split_ratio"] == EVAL_RATIO
    for package in ("torch", "transformers", "trl"):
        assert training["versions"][package]
    assert training["data_fingerprint"] == fingerprint(bert_run.train_rows)
    assert len(training["data_fingerprint"]) == 64


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_model_card(bert_run):
    card = (bert_run.output_dir / "README.md").read_text()
    assert card.startswith("---\n") and "reward-model" in card
    assert f"{bert_run.manifest['eval']['accuracy']:.4f}" in card
    assert "reward-serve" in card


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_no_pair_is_dropped_and_truncation_is_counted(bert_run, tiny_bert_dir):
    from transformers import AutoTokenizer

    rows = mixed_length_rows()
    n_eval = round(len(rows) * EVAL_RATIO)
    assert len(bert_run.eval_rows) == n_eval
    assert len(bert_run.train_rows) == len(rows) - n_eval
    assert len(bert_run.trainer.train_dataset) == len(rows) - n_eval  # nothing filtered out for length
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)

    def count(subset):
        return sum(too_long(tokenizer, r, "chosen") or too_long(tokenizer, r, "rejected") for r in subset)

    assert 0 < count(rows) < len(rows)  # the data really mixes long and short pairs
    assert bert_run.manifest["training"]["train_truncated"] == count(bert_run.train_rows)
    assert bert_run.manifest["eval"]["truncated"] == count(bert_run.eval_rows)
    assert all(len(ids) <= MAX_LENGTH for ids in bert_run.trainer.train_dataset["chosen_ids"])
    assert all(len(ids) <= MAX_LENGTH for ids in bert_run.trainer.train_dataset["rejected_ids"])


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_reloaded_checkpoint_reproduces_the_trainers_rewards(bert_run):
    checkpoint = load_checkpoint(bert_run.output_dir)
    n = 6
    chosen, rejected, features = trainer_rewards(bert_run.trainer, n)
    for row, feature in zip(bert_run.train_rows[:n], features, strict=True):
        c, r = checkpoint.formatter.encode_pair(row)  # the recipe read back from the manifest
        assert c.input_ids == feature["chosen_ids"] and r.input_ids == feature["rejected_ids"]
    encoded = [checkpoint.formatter.encode_pair(row) for row in bert_run.train_rows[:n]]
    reloaded = forward_scores(checkpoint, [c.input_ids for c, _ in encoded] + [r.input_ids for _, r in encoded])
    assert reloaded[:n] == pytest.approx(chosen, abs=1e-5)
    assert reloaded[n:] == pytest.approx(rejected, abs=1e-5)


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_manifest_metrics_match_a_fresh_evaluation(bert_run):
    checkpoint = load_checkpoint(bert_run.output_dir)
    on_eval = evaluate_pairs(checkpoint, bert_run.eval_rows)
    assert on_eval["accuracy"] == bert_run.manifest["eval"]["accuracy"]  # exact: same function, checkpoint, rows
    assert on_eval["mean_margin"] == pytest.approx(bert_run.manifest["eval"]["mean_margin"], abs=1e-5)
    on_train = evaluate_pairs(checkpoint, bert_run.train_rows)
    assert on_train["normalization"]["mean"] == pytest.approx(bert_run.manifest["normalization"]["mean"], abs=1e-5)
    assert on_train["normalization"]["std"] == pytest.approx(bert_run.manifest["normalization"]["std"], abs=1e-5)


@pytest.mark.slow  # a reward-train run as a subprocess
def test_cli_checkpoint_fixture(trained_bert_checkpoint):
    """The subprocess ``reward-train`` run the service tests reuse: loadable, with a manifest and the recipe."""
    checkpoint = load_checkpoint(trained_bert_checkpoint)
    assert checkpoint.manifest is not None
    assert checkpoint.formatter.recipe.max_length == MAX_LENGTH
    assert checkpoint.manifest["eval"]["n"] == 6  # 25% of the 24 tiny pairs
    assert checkpoint.manifest["training"]["n_train"] == 18
    assert set(checkpoint.normalization) >= {"mean", "std"}


# -- the decoder path -----------------------------------------------------------------------------------------------
@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_decoder_trains_and_writes_pad_token_id(llama_run, tiny_llama_dir):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = llama_run.output_dir
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == base.eos_token_id  # pad fell back to eos and reached the config
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token_id == base.eos_token_id
    fmt = llama_run.manifest["formatting"]
    assert fmt["architecture"] == "decoder" and fmt["append_eos"] is True and fmt["eos_token_id"] == base.eos_token_id
    assert fmt["chat_template_sha256"] == hashlib.sha256(base.chat_template.encode()).hexdigest()
    assert llama_run.manifest["eval"]["n"] == 4 and len(llama_run.trainer.train_dataset) == 12


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_decoder_rewards_reproduce_with_the_chat_template(llama_run, tiny_llama_dir):
    checkpoint = load_checkpoint(llama_run.output_dir)
    tokenizer = checkpoint.formatter.tokenizer
    n = 4
    chosen, rejected, features = trainer_rewards(llama_run.trainer, n)
    for row, feature in zip(llama_run.train_rows[:n], features, strict=True):
        expected = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)
        assert feature["chosen_ids"] == list(expected["input_ids"])  # messages went through the chat template
    ids = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
    reloaded = forward_scores(checkpoint, ids)
    assert reloaded == pytest.approx(chosen + rejected, abs=1e-5)


@pytest.mark.slow  # a reward-train run (two steps, in-process)
def test_decoder_checkpoint_gives_a_pre_templated_text_no_second_bos(llama_run):
    """The rule is in the manifest training wrote, so the loaded (served) formatter applies it too."""
    assert llama_run.manifest["formatting"]["skip_duplicate_specials"] is True
    checkpoint = load_checkpoint(llama_run.output_dir)
    bos = checkpoint.formatter.tokenizer.bos_token
    plain = checkpoint.formatter.encode({"text": "user: hello world"}).input_ids
    assert checkpoint.formatter.encode({"text": bos + "user: hello world"}).input_ids == plain


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_cases(tmp_path, tiny_bert_dir):
    missing_column = write_jsonl(tmp_path / "no_rejected.jsonl", [{"prompt": "q", "chosen": "a"}] * 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unreadable = tmp_path / "binary.jsonl"
    unreadable.write_bytes(b"\xff\xfe\x00\x81 not text")
    good = write_jsonl(tmp_path / "good.jsonl", demo_data.generate_pairs(8, seed=5))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(tiny_bert_dir) / name).read_bytes())
    return {
        "missing_column": (tiny_bert_dir, missing_column, "missing column 'rejected'"),
        "empty": (tiny_bert_dir, empty, "empty"),
        "unreadable": (tiny_bert_dir, unreadable, "binary.jsonl"),
        "missing_file": (tiny_bert_dir, tmp_path / "absent.jsonl", "absent.jsonl"),
        "no_tokenizer": (no_tokenizer, good, "tokenizer"),
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("reward-train: error:")]


@pytest.mark.parametrize("case", ["missing_column", "empty", "unreadable", "missing_file", "no_tokenizer"])
def test_bad_input_exits_2_with_one_clear_line(bad_cases, case, tmp_path, capsys):
    from training.train import main

    model, data, needle = bad_cases[case]
    code = main(reward_train_argv(model, data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


@pytest.mark.slow  # reward-train as a subprocess, once per bad input
def test_bad_input_subprocess_has_no_traceback(bad_cases, tmp_path):
    model, data, needle = bad_cases["missing_column"]
    result = run_module("training.train", *reward_train_argv(model, data, tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and needle in lines[0]


# -- the demo data --------------------------------------------------------------------------------------------------
def test_demo_data_is_deterministic_and_well_formed():
    rows = demo_data.generate_pairs(600, seed=0, with_metadata=True)
    assert rows == demo_data.generate_pairs(600, seed=0, with_metadata=True)
    assert rows != demo_data.generate_pairs(600, seed=1, with_metadata=True)
    assert len(rows) == 600
    for row in rows:
        assert all(isinstance(row[k], str) and row[k].strip() for k in ("prompt", "chosen", "rejected"))
        assert row["chosen"] != row["rejected"]
    assert {r["kind"] for r in rows} == set(demo_data.BAD_KINDS)
    assert {r["topic"] for r in rows} == {t["name"] for t in demo_data.TOPICS}
    assert len({r["chosen"] for r in rows}) > 500  # composed, not repeated strings
    plain = demo_data.generate_pairs(5, seed=0)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in plain)


def test_demo_data_split_holds_out_whole_topics():
    train_rows, eval_rows = demo_data.generate_split(600, seed=0, eval_fraction=0.2, with_metadata=True)
    assert len(train_rows) == 480 and len(eval_rows) == 120
    train_topics = {r["topic"] for r in train_rows}
    eval_topics = {r["topic"] for r in eval_rows}
    assert train_topics and eval_topics and not train_topics & eval_topics
    # off-topic answers in the held-out set are borrowed from held-out topics only
    train_answers = {r["chosen"] for r in train_rows}
    assert not {r["rejected"] for r in eval_rows if r["kind"] == "off_topic"} & train_answers


def test_demo_texts_are_short(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    rows = demo_data.generate_pairs(600, seed=0)
    longest = max(len(tokenizer(r["prompt"] + r[s])["input_ids"]) for r in rows for s in ("chosen", "rejected"))
    assert longest < 80


def test_demo_data_cli_and_conversational(tmp_path):
    assert demo_data.main([str(tmp_path / "d" / "demo.jsonl"), "--n", "10", "--seed", "3"]) == 0
    lines = (tmp_path / "d" / "demo.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == demo_data.generate_pairs(10, seed=3)
    conv = demo_data.to_conversational(demo_data.generate_pairs(3, seed=3))
    from training.formatting import pair_side

    side = pair_side(conv[0], "chosen")
    assert [m["role"] for m in side["messages"]] == ["user", "assistant"]
