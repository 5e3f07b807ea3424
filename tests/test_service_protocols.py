"""The training frameworks' protocols through a real uvicorn server: OpenRLHF's ``/get_reward``, slime's ``/reward``
and vLLM's ``/classify``, ``/v1/models`` and ``/health`` (with vLLM's example client and the OpenAI SDK).

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

from tests.fixtures.servers import ThreadedServer, app_client, make_settings

KEY = "protocols-k3y"
PROMPT = "what is two plus two? "
ANSWERS = ["four, thanks for the question", "five i think", "it is four"]
LONG = "the cat is blue " * 40  # over the tiny model's max_length of 64 tokens: truncated


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def server(tiny_reward_checkpoint: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(make_settings(tiny_reward_checkpoint, max_wait_ms=1, max_text_chars=2000)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tiny_reward_checkpoint: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(make_settings(tiny_reward_checkpoint, max_wait_ms=1, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def formatter(tiny_reward_checkpoint: Path):
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


def test_openrlhf_up_to_0_9_0_posts_a_whole_rollout_step_and_the_defaults_take_it(tiny_reward_checkpoint):
    """OpenRLHF 0.9.0, ``openrlhf/trainer/ppo_utils/experience_maker.py`` ``make_experience``: every sample of the
    step (rollout batch x samples per prompt) goes to ``RemoteRewardModel.get_rewards``, which posts one shard per
    URL through ``remote_rm_fn_ray`` -> ``request_api_wrapper`` (``openrlhf/utils/remote_rm_utils.py``):
    ``requests.post(url, json={"query", "prompts", "labels"}, timeout=180)``, ``raise_for_status()`` and 5 tries,
    then ``update_samples_with_rewards`` concatenates each shard's ``rewards`` and splits them per micro-batch.
    With one URL that is one request for the whole step: here 275 prompts x 4 samples, each label a reference
    solution, over the 1024 items and 8 MiB the service took before (a real step is larger: docs/frameworks.md sizes
    the defaults for 1024 x 8 samples of 2048 tokens); the default limits (a server started without limit flags)
    take it."""
    import torch

    n_prompts, n_samples = 275, 4
    prompts = [f"question {i}: " + "why is the sky blue? " * 60 for i in range(n_prompts)]
    queries = [p + f"answer {j}: " + "because of scattering. " * 25 for p in prompts for j in range(n_samples)]
    solution = "rayleigh scattering favours short wavelengths. " * 100
    body = {
        "query": queries,
        "prompts": [p for p in prompts for _ in range(n_samples)],
        "labels": [solution] * len(queries),
    }
    with ThreadedServer(make_settings(tiny_reward_checkpoint)) as server:  # every limit at its default
        response = httpx.post(server.url + "/get_reward", json=body, timeout=180)
        assert len(queries) > 1024 and len(response.request.content) > 8 * 1024 * 1024
        assert response.status_code == 200, response.text[:500]
        picked = [0, len(queries) // 2, len(queries) - 1]
        expected = scores(server, [{"text": queries[i]} for i in picked])
    info = response.json()
    samples_len = [n_samples] * n_prompts  # each prompt's samples, as make_experience splits the rewards back
    rewards = torch.cat([torch.as_tensor(info["rewards"])]).split(samples_len)
    assert len(rewards) == n_prompts and all(len(r) == n_samples for r in rewards)
    assert [info["rewards"][i] for i in picked] == pytest.approx(expected, abs=1e-4)


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


# -- vLLM /classify and /v1/models ---------------------------------------------------------------------------------
def test_vllms_classify_example_client_lists_the_model_then_classifies(server, formatter):
    """vLLM, ``examples/pooling/classify/classification_online.py``: ``requests.get(base_url + "/v1/models",
    headers=headers)``, ``model = response.json()["data"][0]["id"]``, then ``requests.post(base_url + "/classify",
    headers=headers, json={"model": model, "input": prompts})`` with ``headers = {"accept": "application/json",
    "Content-Type": "application/json"}``; the answer is vLLM's ``ClassificationResponse``
    (``vllm/entrypoints/pooling/classify/protocol.py``) with vLLM's default activation (the sigmoid for one logit)
    and ``label = id2label[argmax(probs)]``, ``LABEL_0`` for a one-logit model. SGLang's client posts the same body
    to ``/v1/classify``."""
    headers = {"accept": "application/json", "Content-Type": "application/json"}
    listed = httpx.get(server.url + "/v1/models", headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    model = listed.json()["data"][0]["id"]
    assert model == httpx.get(server.url + "/info").json()["model"]
    texts = [PROMPT + ANSWERS[0], PROMPT + ANSWERS[1]]
    raw = scores(server, [{"text": t} for t in texts])
    for path in ("/classify", "/v1/classify"):
        response = httpx.post(server.url + path, headers=headers, json={"model": model, "input": texts}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "object", "created", "model", "data", "usage"}
        assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == model
        assert isinstance(body["created"], int)
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert all(d["num_classes"] == 1 and len(d["probs"]) == 1 for d in body["data"])
        assert [d["label"] for d in body["data"]] == ["LABEL_0", "LABEL_0"]  # exact: the config's id2label[0]
        assert [d["probs"][0] for d in body["data"]] == pytest.approx([sigmoid(x) for x in raw], abs=1e-5)
        tokens = sum(len(formatter.encode({"text": t}).input_ids) for t in texts)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens


def test_v1_models_answers_as_vllm_lists_a_model(server, tiny_reward_checkpoint):
    """vLLM ``OpenAIServingModels.show_available_models``: one ``ModelCard`` per served model, ``id`` the served
    name, ``root`` the model path, ``max_model_len``, one ``ModelPermission``; ``ModelList(object="list")``."""
    info = httpx.get(server.url + "/info").json()
    body = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == info["model"] and card["object"] == "model" and isinstance(card["created"], int)
    assert card["root"] == str(tiny_reward_checkpoint.resolve()) and card["parent"] is None
    assert card["max_model_len"] == info["formatting"]["max_length"] == 64
    assert isinstance(card["owned_by"], str) and card["permission"][0]["object"] == "model_permission"


def test_the_openai_sdk_lists_the_served_model(keyed):
    """The OpenAI SDK (``openai.OpenAI(base_url=.../v1, api_key=KEY).models.list()``), as a vLLM user's code
    calls it, sends ``GET /v1/models`` with ``Authorization: Bearer KEY`` and reads the page's ``data``."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    served = httpx.get(keyed.url + "/info").json()["model"]
    assert [m.id for m in client.models.list()] == [served]
    assert client.models.list().data[0].owned_by
    with pytest.raises(openai.AuthenticationError):  # vLLM guards /v1 routes with its --api-key too
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_health_is_vllms_probe_empty_200_when_ready_503_while_loading(server, controlled, tiny_reward_checkpoint):
    """vLLM ``GET /health`` answers 200 with an empty body, 503 (empty) when its engine is dead; it serves nothing
    while loading. Here loading is 503 as well, and scoring routes tell the same with Retry-After."""
    ready = httpx.get(server.url + "/health", timeout=30)
    assert ready.status_code == 200 and ready.content == b""
    from fastapi.testclient import TestClient

    from service.app import create_app

    controlled.warm_gate.clear()  # the app stays in its loading phase until this opens
    app = create_app(make_settings(tiny_reward_checkpoint), controlled)
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.content == b""
        listed = client.get("/v1/models")
        assert listed.status_code == 503 and "retry-after" in listed.headers
        controlled.warm_gate.set()
        assert app.state.runtime.wait_until_loaded(30)
        assert client.get("/health").status_code == 200


def test_classify_activation_flags_as_vllm_reads_them(server):
    """vLLM ``get_use_activation``: the deprecated ``softmax``, then the deprecated ``activation``, then
    ``use_activation``; none set means the pooler's default, the activation (the sigmoid for one logit)."""
    text = PROMPT + ANSWERS[2]
    (raw,) = scores(server, [{"text": text}])

    def probs(**flags) -> float:
        response = httpx.post(server.url + "/classify", json={"input": text, **flags}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["probs"][0]

    on, off = pytest.approx(sigmoid(raw), abs=1e-5), pytest.approx(raw, abs=1e-5)
    assert probs() == on  # no model: the served one; no flag: vLLM's default
    assert probs(use_activation=False) == off and probs(use_activation=True) == on
    assert probs(activation=False) == off and probs(softmax=False) == off
    assert probs(softmax=True, use_activation=False) == on  # the deprecated spelling is read first
    assert probs(softmax=False, activation=True) == off
    assert probs(activation=True, use_activation=False) == on


def test_classify_answers_the_raw_score_for_a_regression_config_as_vllm(tiny_reward_checkpoint, tmp_path):
    """vLLM ``get_classification_activation_function``: a config with ``problem_type: regression`` gets the
    identity, whatever the request's flags."""
    import json
    import shutil

    checkpoint = shutil.copytree(tiny_reward_checkpoint, tmp_path / "regression")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "problem_type": "regression"}))
    with app_client(make_settings(checkpoint, backend="torch")) as client:
        (raw,) = client.post("/score", json={"items": [{"text": PROMPT}]}).json()["scores"]
        for flags in ({}, {"use_activation": True}, {"softmax": True}):
            response = client.post("/classify", json={"input": PROMPT, **flags})
            assert response.json()["data"][0]["probs"] == pytest.approx([raw], abs=1e-5), flags


def test_classify_takes_openai_content_parts_wherever_messages_are(server):
    """OpenAI-style content parts (vLLM's ``examples/pooling/classify/vision_classification_online.py`` posts
    ``{"role": "user", "content": [{"type": "text", "text": ...}, ...]}``): text parts are joined with newlines, as
    vLLM renders them for a text chat template; other part types are refused by name (a text-only model)."""
    parts = [{"type": "text", "text": PROMPT}, {"type": "text", "text": "be brief"}]
    flat = [{"role": "user", "content": PROMPT + "\n" + "be brief"}, {"role": "assistant", "content": ANSWERS[0]}]
    with_parts = [{"role": "user", "content": parts}, {"role": "assistant", "content": ANSWERS[0]}]
    (expected,) = scores(server, [{"messages": flat}])
    assert scores(server, [{"messages": with_parts}]) == pytest.approx([expected], abs=1e-5)
    response = httpx.post(server.url + "/classify", json={"messages": with_parts, "use_activation": False})
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["probs"] == pytest.approx([expected], abs=1e-5)
    reward = httpx.post(server.url + "/reward", json={"prompt": with_parts[:1], "response": ANSWERS[0], "label": 1})
    assert reward.status_code == 200 and reward.json()["reward"] == pytest.approx(expected, abs=1e-5)
    pair = {"prompt": with_parts[:1], "chosen": with_parts[1:], "rejected": [{"role": "assistant", "content": "x"}]}
    compared = httpx.post(server.url + "/compare", json={"pairs": [pair]})
    assert compared.status_code == 200 and compared.json()["chosen_scores"] == pytest.approx([expected], abs=1e-5)
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}}
    refused = httpx.post(server.url + "/classify", json={"messages": [{"role": "user", "content": [*parts, image]}]})
    assert_422_at(refused, ["body", "messages", 0, "content", "parts", 2])
    assert "image_url" in refused.text


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
