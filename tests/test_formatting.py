"""The formatting contract (training/formatting.py) on a real encoder tokenizer and a real decoder tokenizer."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.formatting import (
    Formatter,
    FormattingError,
    FormattingRecipe,
    detect_architecture,
    ensure_pad_token,
    item_shape,
    pair_side,
    recipe_for,
)

WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "bird",
    "tree",
    "river",
    "city",
]
LONG_TEXT = " ".join(WORDS * 2)  # 38 words, each a single word-piece in the tiny BERT vocabulary


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tokenizer.pad_token is None  # the tiny decoder deliberately has no pad token
    return tokenizer


def fmt(tokenizer, max_length=512, side="left") -> Formatter:
    return Formatter(tokenizer, recipe_for(tokenizer, max_length=max_length, truncation_side=side))


def body(tokenizer, text):
    """The ids of a text without any special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- architecture, recipe -------------------------------------------------------------------------------------------
def test_architecture_detection_and_recipe_defaults(bert_tok, llama_tok):
    assert detect_architecture(bert_tok) == "encoder"
    assert detect_architecture(llama_tok) == "decoder"
    enc, dec = recipe_for(bert_tok), recipe_for(llama_tok)
    assert (enc.architecture, enc.append_eos, enc.eos_token_id) == ("encoder", False, None)
    assert (dec.architecture, dec.append_eos, dec.eos_token_id) == ("decoder", True, llama_tok.eos_token_id)
    assert enc.chat_template is None and enc.chat_template_sha256 is None
    assert dec.chat_template == llama_tok.chat_template and len(dec.chat_template_sha256) == 64


def test_ensure_pad_token_falls_back_to_eos_and_writes_config(tiny_llama_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert tokenizer.pad_token is None and config.pad_token_id is None
    pad_id = ensure_pad_token(tokenizer, config)
    assert pad_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert config.pad_token_id == pad_id
    assert tokenizer.padding_side == "right"


def test_recipe_round_trips_through_dict_and_json(llama_tok):
    recipe = recipe_for(llama_tok, max_length=77, truncation_side="right")
    data = recipe.to_dict()
    assert data["max_length"] == 77 and data["truncation_side"] == "right"
    assert FormattingRecipe.from_dict(data) == recipe
    assert FormattingRecipe.from_dict(json.loads(json.dumps(data))) == recipe
    # unknown keys written by a newer version are ignored, not an error
    assert FormattingRecipe.from_dict({**data, "future_field": 1}) == recipe


def test_max_length_below_two_is_rejected(bert_tok):
    with pytest.raises(FormattingError, match="max_length"):
        fmt(bert_tok, max_length=1)


# -- encoder --------------------------------------------------------------------------------------------------------
def test_encoder_text_has_one_sep_and_no_eos(bert_tok):
    enc = fmt(bert_tok).encode({"text": "the quick brown fox"})
    assert enc.input_ids == bert_tok("the quick brown fox")["input_ids"]
    assert enc.input_ids[0] == bert_tok.cls_token_id
    assert enc.input_ids[-1] == bert_tok.sep_token_id
    assert enc.input_ids.count(bert_tok.sep_token_id) == 1
    assert enc.input_ids.count(bert_tok.cls_token_id) == 1
    assert not enc.truncated and enc.original_length == len(enc.input_ids)


def test_encoder_left_truncation_keeps_end_and_special_tokens(bert_tok):
    full = body(bert_tok, LONG_TEXT)
    assert len(full) == 2 * len(WORDS)
    enc = fmt(bert_tok, max_length=10, side="left").encode({"text": LONG_TEXT})
    assert enc.truncated and enc.original_length == len(full) + 2
    assert len(enc.input_ids) == 10
    assert enc.input_ids[0] == bert_tok.cls_token_id and enc.input_ids[-1] == bert_tok.sep_token_id
    assert enc.input_ids[1:-1] == full[-8:]  # the END of the reply survives


def test_encoder_right_truncation_keeps_start(bert_tok):
    full = body(bert_tok, LONG_TEXT)
    enc = fmt(bert_tok, max_length=10, side="right").encode({"text": LONG_TEXT})
    assert enc.truncated and len(enc.input_ids) == 10
    assert enc.input_ids[0] == bert_tok.cls_token_id and enc.input_ids[-1] == bert_tok.sep_token_id
    assert enc.input_ids[1:-1] == full[:8]


def test_exact_fit_is_not_truncated(bert_tok):
    ids = bert_tok(LONG_TEXT)["input_ids"]
    enc = fmt(bert_tok, max_length=len(ids)).encode({"text": LONG_TEXT})
    assert enc.input_ids == ids and not enc.truncated
    assert fmt(bert_tok, max_length=len(ids) - 1).encode({"text": LONG_TEXT}).truncated


def test_encoder_messages_need_a_chat_template(bert_tok):
    with pytest.raises(FormattingError, match="chat template"):
        fmt(bert_tok).encode({"messages": [{"role": "user", "content": "hello"}]})


# -- decoder --------------------------------------------------------------------------------------------------------
def test_decoder_appends_eos_exactly_once(llama_tok):
    eos = llama_tok.eos_token_id
    f = fmt(llama_tok)
    plain = f.encode({"text": "hello world"})
    assert plain.input_ids == llama_tok("hello world")["input_ids"] + [eos]
    assert plain.input_ids[0] == llama_tok.bos_token_id
    assert plain.input_ids.count(eos) == 1
    # a text that already ends with the eos token is not given a second one
    closed = f.encode({"text": "hello world" + llama_tok.eos_token})
    assert closed.input_ids == plain.input_ids
    assert closed.input_ids.count(eos) == 1


def test_a_text_that_already_starts_with_bos_gets_no_second_one(llama_tok):
    """OpenRLHF's query is prompt + response decoded with the policy's special tokens: it starts with bos."""
    bos, eos = llama_tok.bos_token_id, llama_tok.eos_token_id
    assert llama_tok("hello world")["input_ids"][0] == bos  # the tokenizer itself adds a bos
    f = fmt(llama_tok)
    plain = f.encode({"text": "hello world"}).input_ids
    assert plain[0] == bos and plain.count(bos) == 1
    assert f.encode({"text": "<s>hello world"}).input_ids == plain
    assert f.encode({"text": "<s>hello world</s>"}).input_ids == plain
    assert f.encode({"prompt": "<s>hello", "response": " world"}).input_ids == plain
    # only the duplicate goes: a bos in the middle of a text is the text's own
    middle = f.encode({"text": "hello<s> world"}).input_ids
    assert middle.count(bos) == 2 and middle[-1] == eos


def test_a_text_that_already_ends_with_eos_gets_no_second_one_from_the_tokenizer():
    """A tokenizer that adds eos itself (no eos appended by the recipe) keeps one eos at the end."""
    from bench.tiny import make_llama_tokenizer

    tokenizer = make_llama_tokenizer(add_eos=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer("hello world</s>")["input_ids"][-2:] == [eos, eos]  # what the rule prevents
    f = fmt(tokenizer)
    plain = f.encode({"text": "hello world"}).input_ids
    assert plain[0] == bos and plain[-1] == eos and plain.count(eos) == 1 and plain.count(bos) == 1
    assert f.encode({"text": "hello world</s>"}).input_ids == plain
    assert f.encode({"text": "<s>hello world</s>"}).input_ids == plain


def test_recipes_from_before_the_rule_keep_their_old_ids(llama_tok):
    """A manifest without ``skip_duplicate_specials`` loads with it off: served as it was trained."""
    data = recipe_for(llama_tok).to_dict()
    assert data["skip_duplicate_specials"] is True
    del data["skip_duplicate_specials"]
    old = Formatter(llama_tok, FormattingRecipe.from_dict(data))
    assert old.recipe.skip_duplicate_specials is False
    bos = llama_tok.bos_token_id
    assert old.encode({"text": "<s>hello world"}).input_ids == [
        bos,
        *fmt(llama_tok).encode({"text": "hello world"}).input_ids,
    ]


def test_encoders_are_untouched_by_the_bos_rule(bert_tok):
    recipe = recipe_for(bert_tok)
    assert recipe.skip_duplicate_specials is True
    f = Formatter(bert_tok, recipe)
    assert f.encode({"text": "the quick brown fox"}).input_ids == bert_tok("the quick brown fox")["input_ids"]


def test_decoder_left_truncation_keeps_bos_eos_and_end(llama_tok):
    full = body(llama_tok, LONG_TEXT)
    enc = fmt(llama_tok, max_length=12, side="left").encode({"text": LONG_TEXT})
    assert enc.truncated and enc.original_length == len(full) + 2
    assert len(enc.input_ids) == 12
    assert enc.input_ids[0] == llama_tok.bos_token_id and enc.input_ids[-1] == llama_tok.eos_token_id
    assert enc.input_ids[1:-1] == full[-10:]


def test_decoder_right_truncation_keeps_start(llama_tok):
    full = body(llama_tok, LONG_TEXT)
    enc = fmt(llama_tok, max_length=12, side="right").encode({"text": LONG_TEXT})
    assert enc.input_ids[0] == llama_tok.bos_token_id and enc.input_ids[-1] == llama_tok.eos_token_id
    assert enc.input_ids[1:-1] == full[:10]


def test_messages_use_the_chat_template(llama_tok):
    messages = [
        {"role": "system", "content": "be polite"},
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Place the eggs in a pot and cover them with cold water."},
    ]
    enc = fmt(llama_tok).encode({"messages": messages})
    expected = llama_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(expected)
    rendered = llama_tok.apply_chat_template(messages, tokenize=False)
    assert "assistant: Place the eggs" in rendered  # the template really was applied
    assert not enc.truncated


def test_messages_truncation_keeps_template_end(llama_tok):
    messages = [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "the quick brown fox"}]
    full = list(llama_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    enc = fmt(llama_tok, max_length=16).encode({"messages": messages})
    assert enc.truncated and len(enc.input_ids) == 16 and enc.original_length == len(full)
    assert enc.input_ids[0] == llama_tok.bos_token_id
    assert enc.input_ids[-1] == llama_tok.eos_token_id
    assert enc.input_ids[1:] == full[-15:]


# -- shapes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tok_name", ["bert_tok", "llama_tok"])
def test_prompt_response_equals_concatenated_text(request, tok_name):
    tokenizer = request.getfixturevalue(tok_name)
    f = fmt(tokenizer)
    prompt, response = "How do I boil an egg?\n", "Place the eggs in a pot and cover them with cold water."
    assert f.encode({"prompt": prompt, "response": response}) == f.encode({"text": prompt + response})


def test_item_shapes(bert_tok):
    assert item_shape({"text": "a"}) == "text"
    assert item_shape({"prompt": "a", "response": "b"}) == "prompt_response"
    assert item_shape({"messages": [{"role": "user", "content": "a"}]}) == "messages"
    assert item_shape({"text": "a", "prompt": None}) == "text"  # explicit nulls do not count as fields


@pytest.mark.parametrize(
    "item, match",
    [
        ({}, "'text', 'prompt' \\+ 'response', or 'messages'"),
        ({"other": "x"}, "'text'"),
        ({"text": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one shape.*text.*messages"),
        ({"text": "a", "prompt": "b", "response": "c"}, "exactly one shape.*text.*prompt.*response"),
        ({"prompt": "a"}, "exactly one shape.*prompt"),
        ({"response": "a"}, "exactly one shape.*response"),
        ({"text": 3}, "'text' must be a string, got int"),
        ({"text": ["a"]}, "'text' must be a string, got list"),
        ({"prompt": 1, "response": "b"}, "'prompt' must be a string"),
        ({"prompt": "a", "response": {"x": 1}}, "'response' must be a string, got dict"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hello"]}, "messages\\[0\\] must be an object"),
        ({"messages": [{"role": 1, "content": "a"}]}, "messages\\[0\\].role must be a string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
            "messages\\[1\\].content must be a string",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages\\[0\\].content must be a string"),
    ],
)
def test_bad_items_raise_formatting_error_naming_the_field(llama_tok, item, match):
    with pytest.raises(FormattingError, match=match):
        fmt(llama_tok).encode(item)


def test_formatting_error_is_a_value_error():
    assert issubclass(FormattingError, ValueError)


# -- preference pairs -----------------------------------------------------------------------------------------------
def test_pair_side_semantics():
    assert pair_side({"chosen": "a", "rejected": "b"}, "chosen") == {"text": "a"}
    assert pair_side({"prompt": "q ", "chosen": "a", "rejected": "b"}, "rejected") == {"prompt": "q ", "response": "b"}
    user = [{"role": "user", "content": "q"}]
    good = [{"role": "assistant", "content": "a"}]
    assert pair_side({"prompt": user, "chosen": good, "rejected": good}, "chosen") == {"messages": user + good}
    assert pair_side({"chosen": user + good, "rejected": user}, "chosen") == {"messages": user + good}


@pytest.mark.parametrize(
    "row, side, match",
    [
        ({"chosen": "a"}, "rejected", "missing column 'rejected'"),
        ({"rejected": "a", "chosen": None}, "chosen", "missing column 'chosen'"),
        ({"chosen": 5, "rejected": "b"}, "chosen", "'chosen' must be a string or a list of messages, got int"),
        ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}]}, "chosen", "text 'prompt'"),
        ({"prompt": 3, "chosen": "a"}, "chosen", "'prompt' must be a string"),
    ],
)
def test_pair_side_errors(row, side, match):
    with pytest.raises(FormattingError, match=match):
        pair_side(row, side)


def test_encode_pair_with_prompt(bert_tok):
    f = fmt(bert_tok)
    row = {"prompt": "How do I boil an egg?\n", "chosen": "Use cold water.", "rejected": "Go away."}
    chosen, rejected = f.encode_pair(row)
    assert chosen == f.encode({"text": row["prompt"] + row["chosen"]})
    assert rejected == f.encode({"text": row["prompt"] + row["rejected"]})
    assert chosen.input_ids != rejected.input_ids


def test_encode_pair_conversational(llama_tok):
    f = fmt(llama_tok)
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Use cold water."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    chosen, rejected = f.encode_pair(row)
    expected = llama_tok.apply_chat_template(prompt + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert chosen.input_ids == list(expected)
    assert rejected.input_ids != chosen.input_ids


# -- properties -----------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=60),
    max_length=st.integers(min_value=3, max_value=40),
    side=st.sampled_from(["left", "right"]),
    tok_name=st.sampled_from(["bert", "llama"]),
)
def test_truncation_properties(bert_tok, llama_tok, words, max_length, side, tok_name):
    tokenizer = bert_tok if tok_name == "bert" else llama_tok
    text = " ".join(words)
    full = fmt(tokenizer).encode({"text": text}).input_ids  # untruncated
    enc = fmt(tokenizer, max_length=max_length, side=side).encode({"text": text})
    assert len(enc.input_ids) == min(len(full), max_length)
    assert enc.truncated == (len(full) > max_length)
    assert enc.original_length == len(full)
    # the first and last (special) tokens always survive; the body is a suffix (left) or prefix (right)
    assert enc.input_ids[0] == full[0] and enc.input_ids[-1] == full[-1]
    kept = enc.input_ids[1:-1]
    whole = full[1:-1]
    if kept:
        assert whole[-len(kept) :] == kept if side == "left" else whole[: len(kept)] == kept
