"""Property-based bad input: whatever a client sends to the scoring routes, the answer is never a 5xx.

In-process (TestClient over ``create_app`` with the tiny checkpoint). Every response must be standard JSON (no NaN,
no lone surrogates): a 4xx carries a ``detail`` naming the problem (for a 422, a list of errors whose ``loc``
starts at ``body``); a 200 has one score per item. Bodies are arbitrary JSON values, valid bodies with one field
replaced by an arbitrary value (or removed, or an unknown one added), random bytes, truncated or corrupted JSON,
huge numbers, NaN/Infinity, deep nesting, unicode with lone surrogates, and wrong content types; valid bodies must
get a 200. Also: fuzzed credentials get 401, and messages a chat template refuses (or renders to nothing) get 422.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fixtures.models import build_tiny_bert
from tests.fixtures.servers import app_client, make_settings

pytestmark = pytest.mark.slow  # property-based: hundreds of generated requests per test

MAX_BODY_BYTES = 16_384
MAX_TEXT_CHARS = 300
MAX_ITEMS = 8
ROUTES = ("/score", "/compare", "/get_reward", "/reward", "/classify")
MODEL = "tiny-bert-reward"  # the tiny checkpoint's name, for /classify's model field
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def client(tiny_reward_checkpoint: Path) -> Iterator[Any]:
    settings_ = make_settings(
        tiny_reward_checkpoint,
        max_body_bytes=MAX_BODY_BYTES,
        max_text_chars=MAX_TEXT_CHARS,
        max_items_per_request=MAX_ITEMS,
        max_wait_ms=0,
    )
    with app_client(settings_) as c:
        yield c


# -- strategies ----------------------------------------------------------------------------------------------------
ODD_CHARS = ["\ud800", "\udfff", "\udc80", "\x00", "\ufeff", "\u202e", "\U0001f600", "\u00e9", "\n", "\\", '"']
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(ODD_CHARS)), max_size=20).map("".join),
)
clean_texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
)


def json_values_of(text):
    return st.recursive(
        st.none() | st.booleans() | numbers | text,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
        max_leaves=12,
    )


json_values = json_values_of(texts)


def messages(text=texts):
    """Chat messages whose content is a text or OpenAI-style text parts."""
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=3)
    return st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system"]) | text, "content": text | parts}
        ),
        min_size=1,
        max_size=3,
    )


def score_bodies(text=texts):
    item = st.one_of(
        st.fixed_dictionaries({"text": text}),
        st.fixed_dictionaries({"prompt": text, "response": text}),
        st.fixed_dictionaries({"messages": messages(text)}),
    )
    return st.fixed_dictionaries(
        {"items": st.lists(item, min_size=1, max_size=MAX_ITEMS)}, optional={"normalize": st.booleans()}
    )


def compare_bodies(text=texts):
    """Pairs of texts or of message lists; with a valid ``text`` every pair can be scored (a text prompt never
    meets message-list answers, which the formatting contract refuses)."""
    any_side = text | messages(text)
    mixed = st.fixed_dictionaries({"chosen": any_side, "rejected": any_side}, optional={"prompt": any_side})
    as_texts = st.fixed_dictionaries({"chosen": text, "rejected": text}, optional={"prompt": text})
    as_messages = st.fixed_dictionaries(
        {"chosen": messages(text), "rejected": messages(text)}, optional={"prompt": messages(text)}
    )
    pair = st.one_of(as_texts, as_messages) if text is clean_texts else st.one_of(mixed, as_texts, as_messages)
    return st.fixed_dictionaries({"pairs": st.lists(pair, min_size=1, max_size=4)})


def get_reward_bodies(text=texts):
    return st.fixed_dictionaries(
        {"query": st.lists(text, min_size=1, max_size=MAX_ITEMS)},
        optional={
            "prompts": st.lists(json_values_of(text), max_size=3),
            "labels": st.lists(json_values_of(text), max_size=3),
            "extra": json_values_of(text),
        },
    )


def reward_bodies(text=texts):
    """slime's body: a text or message-list prompt, a response, any label."""
    return st.fixed_dictionaries(
        {"prompt": text | messages(text), "response": text}, optional={"label": json_values_of(text)}
    )


def classify_bodies(text=texts):
    """vLLM's classify body: one text, a list of texts, or one conversation; the model named or not."""
    flags = {name: st.booleans() for name in ("use_activation", "activation", "softmax")}
    options = {"model": st.just(MODEL), **flags}
    return st.one_of(
        st.fixed_dictionaries({"input": text | st.lists(text, min_size=1, max_size=MAX_ITEMS)}, optional=options),
        st.fixed_dictionaries({"messages": messages(text)}, optional=options),
    )


VALID = {
    "/score": score_bodies,
    "/compare": compare_bodies,
    "/get_reward": get_reward_bodies,
    "/reward": reward_bodies,
    "/classify": classify_bodies,
}


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON value (the root included)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += paths(child, prefix + (i,))
    return out


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = replaced(value[head], rest, new)
    return copy


def removed(value: Any, path: tuple) -> Any:
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[head] = removed(value[head], rest)
    else:
        del copy[head]
    return copy


@st.composite
def mutated(draw, route: str) -> Any:
    """A valid body for ``route`` with one field replaced by an arbitrary value, removed, or an unknown one added."""
    body = draw(VALID[route]())
    path = draw(st.sampled_from(paths(body)))
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "remove" and path:
        return removed(body, path)
    if action == "add":
        target = path
        while target and not isinstance(replaced_get(body, target), dict):
            target = target[:-1]
        node = replaced_get(body, target)
        if isinstance(node, dict):
            return replaced(body, target, {**node, draw(texts): draw(json_values)})
    return replaced(body, path, draw(json_values))


def replaced_get(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as Python writes it: NaN/Infinity allowed, lone surrogates as \\ud800 escapes or as raw (invalid) UTF-8."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/merge-patch+json",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/xml",
    "*/*",
    "application",
    "garbage;;;==",
    "application/json; boundary",
    "",
]
content_types = st.one_of(
    st.sampled_from(CONTENT_TYPES),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)


# -- the oracle ----------------------------------------------------------------------------------------------------
def _no_constants(name: str) -> Any:
    raise AssertionError(f"the response holds {name}, which is not JSON")


def check(response, route: str, content: bytes) -> None:
    """Never a 5xx; always standard JSON; 4xx name the problem; 200s have one score per item."""
    assert response.status_code < 500, (route, response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    data = json.loads(response.content.decode("utf-8"), parse_constant=_no_constants)  # strict UTF-8, no NaN
    if response.status_code == 404 and route == "/classify":  # a model field that names another model
        assert "does not exist" in data["detail"], data
        return
    if response.status_code >= 400:
        assert response.status_code in (400, 413, 422), (response.status_code, response.text[:500])
        detail = data["detail"]
        assert detail, data
        if response.status_code == 422:
            assert isinstance(detail, list)
            for error in detail:
                assert error["loc"] and error["loc"][0] == "body", error
                assert isinstance(error["msg"], str) and error["msg"], error
        else:
            assert isinstance(detail, str)
        return
    assert response.status_code == 200, response.text[:500]
    body = json.loads(content)
    assert isinstance(body, dict), "a 200 for a body that is not even an object"
    count = {
        "/score": lambda b: len(b["items"]),
        "/compare": lambda b: len(b["pairs"]),
        "/get_reward": lambda b: len(b["query"]),
        "/reward": lambda b: 1,
        "/classify": lambda b: len(b["input"]) if isinstance(b.get("input"), list) else 1,
    }[route](body)
    values = {
        "/score": lambda d: d["scores"],
        "/compare": lambda d: d["margins"],
        "/get_reward": lambda d: d["rewards"],
        "/reward": lambda d: [d["reward"]],
        "/classify": lambda d: [x["probs"][0] for x in d["data"]],
    }[route](data)
    assert len(values) == count and all(math.isfinite(x) for x in values), data


def post(client, route: str, content: bytes, content_type: str | None = "application/json"):
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(route, content=content, headers=headers)
    check(response, route, content)
    return response


# -- the properties --------------------------------------------------------------------------------------------------
@FUZZ
@given(route=st.sampled_from(ROUTES), body=json_values, ascii_only=st.booleans())
@example(route="/score", body={"items": [{"text": math.nan}]}, ascii_only=True)
@example(route="/score", body={"items": [{"text": "a"}], "normalize": math.inf}, ascii_only=True)
@example(route="/score", body={"items": [{"text": "\ud800"}]}, ascii_only=True)
@example(route="/score", body={"items": [{"\udfff": 1}]}, ascii_only=False)
@example(
    route="/compare",
    body={"pairs": [{"chosen": [{"role": "\ud800", "content": "a"}], "rejected": "b"}]},
    ascii_only=True,
)
@example(route="/get_reward", body={"query": ["x\udc80y"]}, ascii_only=True)
@example(route="/get_reward", body={"query": ["a"], "prompts": [math.nan, "\ud800"]}, ascii_only=True)
def test_arbitrary_json_values_never_get_a_5xx(client, route, body, ascii_only):
    post(client, route, encode(body, ascii_only))


@FUZZ
@given(data=st.data(), route=st.sampled_from(ROUTES), ascii_only=st.booleans())
def test_valid_bodies_with_one_field_wrong_never_get_a_5xx(client, data, route, ascii_only):
    body = data.draw(mutated(route))
    post(client, route, encode(body, ascii_only))


@FUZZ
@given(data=st.data(), route=st.sampled_from(ROUTES))
def test_valid_bodies_are_scored(client, data, route):
    """The other half of the contract: a body the schema accepts, within the limits, is answered 200."""
    body = data.draw(VALID[route](clean_texts))
    content = encode(body, ascii_only=data.draw(st.booleans()))
    response = post(client, route, content)
    expected = 413 if len(content) > MAX_BODY_BYTES else 200  # many escaped astral characters can get there
    assert response.status_code == expected, response.text[:500]


@FUZZ
@given(route=st.sampled_from(ROUTES), content=st.binary(max_size=400), content_type=content_types)
@example(route="/score", content=b"\xff\xfe\xfd", content_type="text/plain")
@example(route="/score", content=b"\xff", content_type="application/octet-stream")
@example(route="/score", content=b"", content_type="application/json")
@example(route="/score", content=b'{"items": [{"text": "\xff"}]}', content_type="application/json")
def test_random_bytes_and_content_types_never_get_a_5xx(client, route, content, content_type):
    post(client, route, content, content_type)


@FUZZ
@given(data=st.data(), route=st.sampled_from(ROUTES), content_type=content_types)
def test_valid_bodies_under_any_content_type_never_get_a_5xx(client, data, route, content_type):
    body = data.draw(VALID[route]())
    post(client, route, encode(body, ascii_only=True), content_type)


@st.composite
def malformed_json(draw) -> bytes:
    route = draw(st.sampled_from(ROUTES))
    raw = encode(draw(VALID[route]()), ascii_only=draw(st.booleans()))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "huge number", "deep", "duplicate keys"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if kind == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    if kind == "insert":
        i = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b",", b"]", b"}", b'"', b"\\", b"NaN", b"-Infinity", b"\\ud800", b"\x00"]))
        return raw[:i] + junk + raw[i:]
    if kind == "huge number":
        digits = draw(st.sampled_from([20, 400, 4300, 4301, 8000]))
        number = draw(
            st.sampled_from(
                [b"9" * digits, b"-" + b"9" * digits, b"1e" + b"9" * min(digits, 50), b"0." + b"0" * digits + b"1"]
            )
        )
        return raw.replace(b"[", b"[" + number + b", ", 1)
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 3000, 7000]))
        opener = draw(st.sampled_from([b"[", b'{"a":']))
        return b'{"items": ' + opener * depth + b"1" + (b"]" if opener == b"[" else b"}") * depth + b"}"
    return raw[:-1] + b', "items": 1, "pairs": 2, "query": 3}' if raw.endswith(b"}") else raw


@FUZZ
@given(route=st.sampled_from(ROUTES), content=malformed_json(), content_type=st.sampled_from(CONTENT_TYPES[:3]))
def test_malformed_json_never_gets_a_5xx(client, route, content, content_type):
    post(client, route, content, content_type)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES),
    n_items=st.integers(MAX_ITEMS + 1, 4 * MAX_ITEMS),
    chars=st.integers(MAX_TEXT_CHARS + 1, 4 * MAX_TEXT_CHARS),
)
def test_limits_answer_4xx_never_5xx(client, route, n_items, chars):
    """Over the item count, the character cap or the body size: 413 or 422, whichever the request hits first."""
    bodies = {
        "/score": ({"items": [{"text": "a"}] * n_items}, {"items": [{"prompt": "p", "response": "x" * chars}]}),
        "/compare": (
            {"pairs": [{"chosen": "a", "rejected": "b"}] * n_items},
            {"pairs": [{"prompt": [{"role": "user", "content": "x" * chars}], "chosen": [], "rejected": []}]},
        ),
        "/get_reward": ({"query": ["a"] * n_items}, {"query": ["x" * chars]}),
        "/reward": ({"prompt": [{"role": "user", "content": "x" * chars}], "response": "a"},),
        "/classify": ({"input": ["a"] * n_items}, {"input": ["a", "x" * chars]}),
    }[route]
    for body in bodies:
        response = post(client, route, encode(body, True))
        assert response.status_code in (413, 422)
    big = post(client, route, b'{"query": ["' + b"x" * (MAX_BODY_BYTES + chars) + b'"]}')
    assert big.status_code == 413 and str(MAX_BODY_BYTES) in big.json()["detail"]


# -- access control under fuzzed credentials --------------------------------------------------------------------------
KEY = "fuzz-k3y"


@pytest.fixture(scope="module")
def keyed_client(tiny_reward_checkpoint: Path) -> Iterator[Any]:
    with app_client(make_settings(tiny_reward_checkpoint, api_key=KEY)) as c:
        yield c


header_values = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES),
    value=st.one_of(
        header_values,
        header_values.map(lambda b: b"Bearer " + b),
        st.sampled_from(
            [
                b"Bearer",
                b"Bearer ",
                b"bearer " + KEY.encode(),
                b"Bearer " + KEY.encode() + b"x",
                b"Bearer " + KEY[:-1].encode(),
                b"Basic " + KEY.encode(),
                KEY.encode(),
                b"Bearer \xe9\xff",
            ]
        ),
    ),
)
def test_wrong_credentials_get_401_never_5xx(keyed_client, route, value):
    body = {
        "/score": {"items": [{"text": "a"}]},
        "/compare": {"pairs": [{"chosen": "a", "rejected": "b"}]},
        "/get_reward": {"query": ["a"]},
        "/reward": {"prompt": "a", "response": "b"},
        "/classify": {"input": "a"},
    }[route]
    response = keyed_client.post(
        route,
        content=json.dumps(body).encode(),
        headers=[(b"content-type", b"application/json"), (b"authorization", value)],
    )
    expected = 200 if value in (b"Bearer " + KEY.encode(), b"bearer " + KEY.encode()) else 401
    assert response.status_code == expected, (value, response.status_code, response.text)
    if expected == 401:
        assert response.headers["www-authenticate"] == "Bearer" and response.json()["detail"]


# -- messages a chat template refuses ---------------------------------------------------------------------------------
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def strict_template_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A checkpoint whose chat template raises for unknown roles and renders only user turns (no special tokens)."""
    path = build_tiny_bert(tmp_path_factory.mktemp("strict-template") / "bert", chat_template=STRICT_TEMPLATE)
    with app_client(make_settings(path)) as c:
        yield c


def test_messages_the_chat_template_refuses_get_422(strict_template_client):
    c = strict_template_client
    assert c.post("/score", json={"items": [{"messages": [{"role": "user", "content": "hello"}]}]}).status_code == 200
    refused = c.post("/score", json={"items": [{"text": "a"}, {"messages": [{"role": "robot", "content": "hi"}]}]})
    assert refused.status_code == 422, refused.text
    error = refused.json()["detail"][0]
    assert error["loc"] == ["body", "items", 1] and "unknown role: robot" in error["msg"]
    pair = c.post(
        "/compare",
        json={
            "pairs": [{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "robot", "content": "b"}]}]
        },
    )
    assert pair.status_code == 422 and pair.json()["detail"][0]["loc"] == ["body", "pairs", 0, "rejected"]


def test_an_item_that_formats_to_no_tokens_gets_422(strict_template_client):
    empty = strict_template_client.post(
        "/score", json={"items": [{"messages": [{"role": "assistant", "content": "hi"}]}]}
    )
    assert empty.status_code == 422, empty.text
    error = empty.json()["detail"][0]
    assert error["loc"] == ["body", "items", 0] and "no tokens" in error["msg"]
