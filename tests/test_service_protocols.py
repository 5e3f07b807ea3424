"""The training frameworks' protocols through a real uvicorn server: OpenRLHF's ``/get_reward``, slime's ``/reward``
and vLLM's ``/classify``.

Each request is shaped as that framework's client sends it (the client's source is named in each test); each value
must equal ``/score``'s for the same text within the request-shape tolerance (1e-5); bad input gets a 422 whose
``loc`` names the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import ThreadedServer, make_settings

KEY = "protocols-k3y"
PROMPT = "what is two plus two? "
ANSWERS = ["four, thanks for the question", "five i think", "it is four"]
LONG = "the cat is blue " * 40  # over the tiny model's max_length of 64 tokens: truncated


@pytest.fixture(scope="module")
def server(tiny_reward_checkpoint: Path) -> Iterator[ThreadedServer]:  # noqa: F811  (the imported fixture, requested by name)
    with ThreadedServer(make_settings(tiny_reward_checkpoint, max_wait_ms=1, max_text_chars=2000)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tiny_reward_checkpoint: Path) -> Iterator[ThreadedServer]:  # noqa: F811  (the imported fixture, requested by name)
    with ThreadedServer(make_settings(tiny_reward_checkpoint, max_wait_ms=1, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def formatter(tiny_reward_checkpoint: Path):  # noqa: F811  (the imported fixture, requested by name)
    from training.checkpoint import load_checkpoint

    return load_checkpoint(tiny_reward_checkpoint, device="cpu").formatter


def scores(server: ThreadedServer, items: list[dict]) -> list[float]:
    response = httpx.post(server.url + "/score", json={"items": items}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["scores"]


def assert_422_at(response: httpx.Response, loc: list) -> None:
    assert response.status_code == 422, response.text
    locs = [err["loc"] for err in response.json()["detail"]]
    assert any(list(found[: len(loc)]) == loc for found in locs), locs


# -- OpenRLHF ---------------------------------------------------------------------------------------------------------
def test_openrlhf_one_sample_per_post_agrees_with_score(server):
    """OpenRLHF v0.9.9, ``openrlhf/utils/agent.py`` ``SingleTurnAgentExecutor._fetch_rewards_via_http``: one sample
    per POST, ``json={"query": [prompt + response], "prompts": [prompt], "labels": [label]}``; it reads ``rewards``,
    ``scores`` and ``extra_logs``, and ``openrlhf/trainer/ppo_utils/samples_generator.py`` makes a tensor of each
    ``extra_logs`` value for its logs."""
    import torch

    expected = scores(server, [{"text": PROMPT + ANSWERS[0]}, {"text": LONG}])
    for query, label, reward, truncated in [
        (PROMPT + ANSWERS[0], "4", expected[0], 0.0),
        (LONG, None, expected[1], 1.0),
    ]:
        response = httpx.post(
            server.url + "/get_reward", json={"query": [query], "prompts": [PROMPT], "labels": [label]}, timeout=30
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["rewards"] == pytest.approx([reward], abs=1e-5)
        assert body["scores"] == body["rewards"]  # exact: one list, sent under both names
        assert body["extra_logs"] == {"truncated": [truncated]}  # exact: a 0.0/1.0 flag, not a score
        logged = {key: torch.tensor([value]) for key, value in body["extra_logs"].items()}  # as OpenRLHF does
        assert logged["truncated"].float().mean().item() == truncated  # exact: the mean of one 0.0/1.0 flag


def test_openrlhf_sharding_over_several_urls_sends_some_replicas_an_empty_query(server):
    """OpenRLHF main, ``--reward.remote_url URL1,URL2`` (split on commas in ``train_ppo_ray.py``): the agent
    executor shards its queries over the URLs with ``batch_size = ceil(n / num_servers)``, so with one sample per
    POST every URL after the first is sent ``"query": []``; the batched path
    (``update_samples_with_rewards``) concatenates every shard's ``rewards`` and each ``extra_logs`` key."""
    import torch

    urls = [server.url + "/get_reward"] * 2
    queries = [PROMPT + a for a in ANSWERS]
    expected = scores(server, [{"text": q} for q in queries])
    for n in (1, 3):
        batch = queries[:n]
        size = math.ceil(len(batch) / len(urls))
        shards = []
        for i, url in enumerate(urls):
            part = slice(i * size, min((i + 1) * size, len(batch)))
            body = {"query": batch[part], "prompts": [PROMPT] * len(batch[part]), "labels": [""] * len(batch[part])}
            response = httpx.post(url, json=body, timeout=30)
            assert response.status_code == 200, response.text
            shards.append(response.json())
        if n == 1:
            assert shards[1] == {"rewards": [], "scores": [], "extra_logs": {"truncated": []}}
        rewards = torch.cat([torch.tensor(s["rewards"], dtype=torch.float32) for s in shards])
        logs = {
            key: torch.cat([torch.tensor(s["extra_logs"][key], dtype=torch.float32) for s in shards])
            for key in shards[0]["extra_logs"]
        }
        assert rewards.tolist() == pytest.approx(expected[:n], abs=1e-5)
        assert logs["truncated"].tolist() == [0.0] * n  # exact: 0.0/1.0 flags, not scores


def test_openrlhf_bad_bodies_get_422_naming_the_field(server):
    url = server.url + "/get_reward"
    assert_422_at(httpx.post(url, json={"prompts": ["p"]}), ["body", "query"])
    assert_422_at(httpx.post(url, json={"query": "not a list"}), ["body", "query"])
    assert_422_at(httpx.post(url, json={"query": ["ok", 7]}), ["body", "query", 1])
    assert_422_at(httpx.post(url, json={"query": ["ok", "x" * 2001]}), ["body", "query", 1])


# -- slime ------------------------------------------------------------------------------------------------------------
def test_slime_string_prompt_is_scored_as_prompt_plus_response(server):
    """slime, ``slime/rollout/rm_hub/__init__.py`` ``remote_rm``: one sample per POST to ``args.rm_url`` as given,
    ``json={"prompt": sample.prompt, "response": sample.response, "label": sample.label}``; it takes the JSON answer,
    and ``--reward-key reward`` reads ``answer["reward"]``."""
    expected = scores(server, [{"prompt": PROMPT, "response": a} for a in ANSWERS[:2]])
    for answer, label, want in [(ANSWERS[0], "4", expected[0]), (ANSWERS[1], {"answer": 4}, expected[1])]:
        response = httpx.post(
            server.url + "/reward", json={"prompt": PROMPT, "response": answer, "label": label}, timeout=30
        )
        assert response.status_code == 200, response.text
        assert response.json()["reward"] == pytest.approx(want, abs=1e-5)


def test_slime_message_prompt_gets_the_response_as_the_assistant_turn(server):
    """slime keeps ``sample.prompt`` as chat messages when the dataset holds them (no ``--apply-chat-template``)."""
    messages = [{"role": "system", "content": "be helpful"}, {"role": "user", "content": PROMPT}]
    expected = scores(server, [{"messages": [*messages, {"role": "assistant", "content": ANSWERS[0]}]}])
    response = httpx.post(
        server.url + "/reward", json={"prompt": messages, "response": ANSWERS[0], "label": None}, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["reward"] == pytest.approx(expected[0], abs=1e-5)


def test_slime_bad_bodies_get_422_naming_the_field(server):
    url = server.url + "/reward"
    assert_422_at(httpx.post(url, json={"prompt": PROMPT, "label": ""}), ["body", "response"])
    assert_422_at(httpx.post(url, json={"prompt": 3, "response": "r"}), ["body", "prompt"])
    assert_422_at(httpx.post(url, json={"prompt": [{"role": "user"}], "response": "r"}), ["body", "prompt"])
    assert_422_at(httpx.post(url, json={"prompt": PROMPT, "response": "x" * 2001}), ["body", "response"])


# -- vLLM /classify ----------------------------------------------------------------------------------------------------
def test_classify_answers_in_vllms_shape_with_the_raw_score(server, formatter):
    """vLLM, ``examples/pooling/classify/openai_classification_client.py``: ``requests.post(base_url + "/classify",
    json={"model": model, "input": prompts})``; the answer is vLLM's ``ClassificationResponse``
    (``vllm/entrypoints/pooling/classify/protocol.py``). SGLang's client posts the same body to ``/v1/classify``."""
    texts = [PROMPT + ANSWERS[0], PROMPT + ANSWERS[1]]
    expected = scores(server, [{"text": t} for t in texts])
    model = httpx.get(server.url + "/info").json()["model"]
    for path in ("/classify", "/v1/classify"):
        response = httpx.post(
            server.url + path,
            json={"model": model, "input": texts},
            headers={"accept": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"}
        assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == model
        assert isinstance(body["created"], int)
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert all(d["num_classes"] == 1 and len(d["probs"]) == 1 for d in body["data"])
        assert [d["probs"][0] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
        tokens = sum(len(formatter.encode({"text": t}).input_ids) for t in texts)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


def test_classify_takes_one_string_messages_and_the_activation_flags(server):
    text = PROMPT + ANSWERS[2]
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWERS[2]}]
    raw_text, raw_messages = scores(server, [{"text": text}, {"messages": conversation}])

    def probs(body: dict) -> list[float]:
        response = httpx.post(server.url + "/classify", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return [d["probs"][0] for d in response.json()["data"]]

    assert probs({"input": text}) == pytest.approx([raw_text], abs=1e-5)  # no model: the served one
    assert probs({"messages": conversation}) == pytest.approx([raw_messages], abs=1e-5)
    sigmoid = 1 / (1 + math.exp(-raw_text))
    assert probs({"input": text, "use_activation": True}) == pytest.approx([sigmoid], abs=1e-5)
    assert probs({"input": text, "activation": True}) == pytest.approx([sigmoid], abs=1e-5)  # older vLLM spelling
    assert probs({"input": text, "use_activation": False, "activation": True}) == pytest.approx([raw_text], abs=1e-5)


def test_classify_refuses_another_model_and_what_it_cannot_honour(server):
    url = server.url + "/classify"
    response = httpx.post(url, json={"model": "meta-llama/Llama-3-8B", "input": "hello"})
    assert response.status_code == 404 and "meta-llama/Llama-3-8B" in response.json()["detail"]
    assert_422_at(httpx.post(url, json={"model": None}), ["body"])  # neither input nor messages
    assert_422_at(httpx.post(url, json={"input": "a", "messages": [{"role": "user", "content": "b"}]}), ["body"])
    assert_422_at(httpx.post(url, json={"input": []}), ["body", "input"])
    assert_422_at(httpx.post(url, json={"input": [101, 2023, 102]}), ["body", "input"])  # token ids: not supported
    assert_422_at(httpx.post(url, json={"input": "a", "truncate_prompt_tokens": 8}), ["body"])
    assert_422_at(httpx.post(url, json={"input": ["ok", "x" * 2001]}), ["body", "input", 1])


# -- the API key -------------------------------------------------------------------------------------------------------
def test_the_api_key_guards_every_protocol_bearer_or_in_the_url(keyed):
    """vLLM's and SGLang's clients send ``Authorization: Bearer <key>`` (their ``--api-key``). OpenRLHF's and slime's
    reward clients take only a URL (aiohttp ``session.post(url, json=...)``; older OpenRLHF ``requests.post``), and
    an HTTP client sends the credentials in a URL (``http://rm:KEY@host/...``) as HTTP Basic, here by httpx as by
    aiohttp and requests: the key is accepted as that password."""
    bodies = {
        "/classify": {"input": "hello"},
        "/v1/classify": {"input": "hello"},
        "/get_reward": {"query": ["hello"], "prompts": [""], "labels": [""]},
        "/reward": {"prompt": "hi", "response": "hello", "label": None},
    }
    with_key = keyed.url.replace("http://", f"http://rm:{KEY}@")
    with_wrong_key = keyed.url.replace("http://", f"http://rm:{KEY}x@")
    for path, body in bodies.items():
        assert httpx.post(keyed.url + path, json=body).status_code == 401, path
        assert httpx.post(with_wrong_key + path, json=body).status_code == 401, path
        assert httpx.post(keyed.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.post(with_key + path, json=body).status_code == 200, path
    malformed = {"Authorization": "Basic not-base64!"}
    response = httpx.post(keyed.url + "/reward", json=bodies["/reward"], headers=malformed)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
