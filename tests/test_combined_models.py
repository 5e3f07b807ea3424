"""Several reward models behind one endpoint (``--model NAME=PATH`` repeated, ``--combine``), through real uvicorn
servers: a tiny encoder (BERT) and a tiny decoder (Llama) served together must give each one's scores as it gives
them served alone (within the request-shape tolerance, 1e-5), and the reward declared; every protocol answers the
combination in its own shape; a request is tokenized once per distinct (recipe, tokenizer)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.commands import run_module
from tests.fixtures.servers import ThreadedServer, metric_value

TOL = 1e-5
PROMPT = "what is two plus two? "
LONG = "the cat is blue " * 40  # over the encoder's max_length of 64 tokens: truncated by it, not by the decoder
ITEMS = [
    {"text": "four, thanks for the question"},
    {"prompt": PROMPT, "response": "five i think"},
    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "it is four"}]},
    {"text": LONG},
]
PAIRS = [
    {"prompt": PROMPT, "chosen": "four", "rejected": "five"},
    {"chosen": "a kind answer", "rejected": "a rude answer"},
]


def settings(*models: str, **overrides):
    from service.settings import ServeSettings

    # torch, one worker of one thread per model: quick to load, and the same forward alone and combined
    fixed = {"backend": "torch", "inference_workers": 1, "torch_threads": 1, "max_wait_ms": 1, "max_text_chars": 2000}
    return ServeSettings(model=list(models), **{**fixed, **overrides})


def post(server: ThreadedServer, route: str, body: dict) -> dict:
    response = httpx.post(server.url + route, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def close(actual: list[float], expected: list[float], tol: float = TOL) -> bool:
    return len(actual) == len(expected) and all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


@pytest.fixture(scope="module")
def enc_alone(tiny_reward_checkpoint: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(settings(str(tiny_reward_checkpoint))) as server:
        yield server


@pytest.fixture(scope="module")
def dec_alone(tiny_llama_dir: Path) -> Iterator[ThreadedServer]:
    with ThreadedServer(settings(str(tiny_llama_dir))) as server:
        yield server


@pytest.fixture(scope="module")
def combined(tiny_reward_checkpoint: Path, tiny_llama_dir: Path) -> Iterator[ThreadedServer]:
    models = (f"enc={tiny_reward_checkpoint}", f"dec={tiny_llama_dir}")
    with ThreadedServer(settings(*models, combine="0.7*enc + 0.3*dec")) as server:
        yield server


def test_each_component_scores_as_served_alone_and_the_reward_is_the_declared_combination(
    combined, enc_alone, dec_alone
):
    enc = post(enc_alone, "/score", {"items": ITEMS})
    dec = post(dec_alone, "/score", {"items": ITEMS})
    both = post(combined, "/score", {"items": ITEMS})
    assert close(both["components"]["enc"], enc["scores"])
    assert close(both["components"]["dec"], dec["scores"])
    declared = [0.7 * e + 0.3 * d for e, d in zip(enc["scores"], dec["scores"], strict=True)]
    assert close(both["scores"], declared)
    assert not close(both["scores"], [e + d for e, d in zip(enc["scores"], dec["scores"], strict=True)])
    # truncated by any component: the long text is cut by the encoder (max_length 64), not by the decoder
    assert enc["truncated"][-1] and not dec["truncated"][-1] and both["truncated"] == enc["truncated"]
    assert both["model"] == "enc+dec" and both["model_version"] not in (enc["model_version"], dec["model_version"])
    assert "components" not in enc  # one model: the answer is as it always was


def test_compare_get_reward_and_slime_answer_the_combination(combined, enc_alone, dec_alone):
    compared = post(combined, "/compare", {"pairs": PAIRS})
    enc = post(enc_alone, "/compare", {"pairs": PAIRS})
    dec = post(dec_alone, "/compare", {"pairs": PAIRS})
    assert close(compared["components"]["enc"], enc["margins"])
    assert close(compared["components"]["dec"], dec["margins"])
    margins = [0.7 * e + 0.3 * d for e, d in zip(enc["margins"], dec["margins"], strict=True)]
    assert close(compared["margins"], margins)
    assert close(compared["probabilities"], [1 / (1 + math.exp(-m)) for m in margins])

    queries = [PROMPT + "four", LONG]
    reward = post(combined, "/get_reward", {"query": queries, "prompts": [PROMPT] * 2, "labels": [None] * 2})
    scored = post(combined, "/score", {"items": [{"text": q} for q in queries]})
    assert close(reward["rewards"], scored["scores"]) and reward["scores"] == reward["rewards"]
    assert set(reward["extra_logs"]) == {"truncated", "enc", "dec"}
    assert close(reward["extra_logs"]["dec"], scored["components"]["dec"])
    assert reward["extra_logs"]["truncated"] == [0.0, 1.0]
    empty = post(combined, "/get_reward", {"query": []})  # a shard with no samples keeps every key
    assert empty == {"rewards": [], "scores": [], "extra_logs": {"truncated": [], "enc": [], "dec": []}}

    slime = post(combined, "/reward", {"prompt": PROMPT, "response": "five i think", "label": None})
    assert abs(slime["reward"] - scored_one(combined, {"prompt": PROMPT, "response": "five i think"})) <= TOL


def scored_one(server: ThreadedServer, item: dict) -> float:
    return post(server, "/score", {"items": [item]})["scores"][0]


def test_classify_serves_the_combination_or_one_component_by_name(combined, dec_alone):
    texts = [PROMPT + "four", PROMPT + "five"]
    raw = {"input": texts, "use_activation": False}
    alone = post(dec_alone, "/classify", raw)
    one = post(combined, "/classify", {**raw, "model": "dec"})
    assert one["model"] == "dec"
    assert close([d["probs"][0] for d in one["data"]], [d["probs"][0] for d in alone["data"]])
    whole = post(combined, "/classify", {"input": texts})  # no model: the combination, with vLLM's activation
    reward = post(combined, "/score", {"items": [{"text": t} for t in texts]})["scores"]
    assert whole["model"] == "enc+dec"
    assert close([d["probs"][0] for d in whole["data"]], [1 / (1 + math.exp(-r)) for r in reward])
    assert post(combined, "/classify", {"input": texts[0], "model": "enc+dec"})["model"] == "enc+dec"

    missing = httpx.post(combined.url + "/classify", json={"input": "x", "model": "helpful"}, timeout=30)
    assert missing.status_code == 404
    assert all(f"`{name}`" in missing.json()["detail"] for name in ("helpful", "enc+dec", "enc", "dec"))
    listed = httpx.get(combined.url + "/v1/models", timeout=30).json()
    assert [card["id"] for card in listed["data"]] == ["enc+dec", "enc", "dec"]
    assert listed["data"][1]["max_model_len"] == 64


def test_info_lists_the_components_and_metrics_observe_each(combined, enc_alone, dec_alone, tiny_llama_dir):
    info = httpx.get(combined.url + "/info", timeout=30).json()
    enc, dec = (httpx.get(s.url + "/info", timeout=30).json() for s in (enc_alone, dec_alone))
    assert [c["name"] for c in info["components"]] == ["enc", "dec"]
    assert info["components"][0]["version"] == enc["model_version"]
    assert info["components"][1]["version"] == dec["model_version"]
    assert info["components"][1]["source"] == str(Path(tiny_llama_dir).resolve())
    assert info["components"][0]["normalization"] == enc["normalization"]
    assert info["combine"] == {
        "expression": "0.7*enc + 0.3*dec",
        "weights": {"enc": 0.7, "dec": 0.3},
        "constant": 0.0,
        "scores": "raw",
    }
    assert info["model"] == "enc+dec" and enc["components"] is None

    post(combined, "/score", {"items": ITEMS})
    text = httpx.get(combined.url + "/metrics", timeout=30).text
    for name, version in (("enc", enc["model_version"]), ("dec", dec["model_version"])):
        assert metric_value(text, "reward_model_info", {"component": name, "version": version}) == 1
        assert metric_value(text, "reward_telemetry_window_items", {"model": name, "version": version}) >= len(ITEMS)


def test_normalize_per_request_is_refused_with_several_models(combined):
    response = httpx.post(combined.url + "/score", json={"items": ITEMS[:1], "normalize": True}, timeout=30)
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "normalize"] and "--combine-scores normalized" in detail["msg"]


def test_normalized_combination_weighs_training_units_and_changes_the_version(
    combined, enc_alone, tiny_reward_checkpoint, tiny_llama_dir
):
    from tests.fixtures.models import NORMALIZATION

    models = (f"enc={tiny_reward_checkpoint}", f"dec={tiny_llama_dir}")
    # the decoder has no manifest statistics; with weight 0 it needs none (and is still served alone)
    with ThreadedServer(settings(*models, combine="2*enc - 1", combine_scores="normalized")) as server:
        scored = post(server, "/score", {"items": ITEMS})
        raw = post(enc_alone, "/score", {"items": ITEMS})["scores"]
        mean, std = NORMALIZATION["mean"], NORMALIZATION["std"]
        assert close(scored["scores"], [2 * (r - mean) / std - 1 for r in raw])
        assert close(scored["components"]["enc"], raw)  # components are raw scores
        version = post(server, "/score", {"items": ITEMS[:1]})["model_version"]
    assert version != post(combined, "/score", {"items": ITEMS[:1]})["model_version"]


def test_a_normalized_combination_of_a_model_without_statistics_fails_the_start(tiny_reward_checkpoint, tiny_llama_dir):
    models = (f"enc={tiny_reward_checkpoint}", f"dec={tiny_llama_dir}")
    with ThreadedServer(settings(*models, combine="enc + dec", combine_scores="normalized")) as server:
        assert httpx.get(server.url + "/readyz", timeout=30).status_code == 503
        failure = server.runtime.lifecycle.failure
    assert "'dec'" in failure and "normalization" in failure and "'enc'" not in failure


class CountingEncoder:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def encode(self, item):
        self.calls += 1
        return self.real.encode(item)


def encode_calls(server: ThreadedServer, monkeypatch: pytest.MonkeyPatch) -> list[CountingEncoder]:
    counters = []
    for component in server.runtime.served.components:
        counter = CountingEncoder(component.engine.scorer.encoder)
        monkeypatch.setattr(component.engine.scorer, "encoder", counter)
        counters.append(counter)
    return counters


def test_a_request_is_tokenized_once_per_distinct_recipe_and_tokenizer(combined, tiny_reward_checkpoint, monkeypatch):
    counters = encode_calls(combined, monkeypatch)  # an encoder and a decoder: two tokenizations
    post(combined, "/score", {"items": ITEMS})
    assert [c.calls for c in counters] == [len(ITEMS), len(ITEMS)]

    # the same checkpoint twice (e.g. two reward labels of one classifier): one tokenization for both
    models = (f"a={tiny_reward_checkpoint}", f"b={tiny_reward_checkpoint}")
    with ThreadedServer(settings(*models)) as twice:
        counters = encode_calls(twice, monkeypatch)
        scored = post(twice, "/score", {"items": ITEMS})
        assert sum(c.calls for c in counters) == len(ITEMS)
        assert close(scored["components"]["a"], scored["components"]["b"])
        assert close(scored["scores"], [2 * a for a in scored["components"]["a"]])  # default: the plain sum


def test_settings_name_models_and_parse_the_combination(monkeypatch):
    from service.cli import parse_settings
    from service.settings import ServeSettings

    monkeypatch.setenv("REWARD_MODEL", "/models/reward")  # the image's and the k8s manifests' form
    assert ServeSettings().components == [(None, "/models/reward")] and ServeSettings().combination is None
    monkeypatch.setenv("REWARD_MODEL", "helpful=/a,harmless=/b")
    assert ServeSettings().components == [("helpful", "/a"), ("harmless", "/b")]
    assert ServeSettings().combination.weights == {"helpful": 1.0, "harmless": 1.0}
    monkeypatch.setenv("REWARD_MODEL", '["helpful=/a", "harmless=/b"]')
    assert ServeSettings().components == [("helpful", "/a"), ("harmless", "/b")]
    monkeypatch.delenv("REWARD_MODEL")

    parsed = parse_settings(["--model", "h=/a", "--model", "g=/b", "--combine", "(h - 0.5*g)/2 + 1"])
    assert parsed.components == [("h", "/a"), ("g", "/b")]
    combination = parsed.combination
    assert (combination.weights, combination.constant) == ({"h": 0.5, "g": -0.25}, 1.0)
    assert parse_settings(["--model", "h=/a", "--model", "g=/b", "--combine", "h"]).combination.weights["g"] == 0.0
    quoted = parse_settings(["--model", "rm-v2=/a", "--model", "g=/b", "--combine", '0.5*"rm-v2" + g'])
    assert quoted.combination.weights == {"rm-v2": 0.5, "g": 1.0}

    for argv, message in [
        (["--combine", "h*g"], "a product of two components"),
        (["--combine", "h + x"], "unknown component 'x'"),
        (["--combine", "h +"], "not a valid expression"),
        (["--combine", "h**2"], "is not allowed"),
        (["--combine", "h/g"], "dividing by a component"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_settings(["--model", "h=/a", "--model", "g=/b", *argv])
    with pytest.raises(ValueError, match="name every one"):
        parse_settings(["--model", "h=/a", "--model", "/b"])
    with pytest.raises(ValueError, match="unique"):
        parse_settings(["--model", "h=/a", "--model", "h=/b"])


def test_cli_names_a_missing_component_folder(tiny_reward_checkpoint, capsys):
    from service.cli import main

    assert main(["--model", f"enc={tiny_reward_checkpoint}", "--model", "dec=/no/such/folder"]) == 2
    assert "--model dec=/no/such/folder: no such checkpoint folder" in capsys.readouterr().err
    assert main(["--model", str(tiny_reward_checkpoint), "--model", str(tiny_reward_checkpoint)]) == 2
    assert "name every one as NAME=PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_a_component_that_fails_to_load_fails_the_start_naming_it(tiny_reward_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    args = ["--port", "0", "--backend", "torch", "--torch-threads", "1"]
    result = run_module(
        "service.cli", "--model", f"good={tiny_reward_checkpoint}", "--model", f"bad={broken}", *args, timeout=180
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"component 'bad' ({broken})" in result.stderr


def test_the_client_and_verl_carry_each_component(combined):
    from service.client import RewardClient
    from service.verl import compute_score_batch

    with RewardClient(combined.url) as client:
        scores = client.score([PROMPT + "four", PROMPT + "five"])
    assert set(scores.components) == {"enc", "dec"} and len(scores.components["dec"]) == 2
    infos = [{"prompt": PROMPT}, {"prompt": PROMPT}]
    rewards = compute_score_batch(
        solution_strs=["four", "five"], extra_infos=infos, reward_service_url=combined.url
    )  # verl's dict form: "score" is the reward, the other keys go to its reward_extra_info
    expected = post(combined, "/score", {"items": [{"prompt": PROMPT, "response": r} for r in ("four", "five")]})
    assert close([r["score"] for r in rewards], expected["scores"])
    assert close([r["enc"] for r in rewards], expected["components"]["enc"])
    plain = compute_score_batch(
        solution_strs=["four"], extra_infos=infos[:1], reward_service_url=combined.url, components=False
    )
    assert isinstance(plain[0], float) and abs(plain[0] - expected["scores"][0]) <= TOL


def test_an_item_one_model_cannot_take_is_a_422_naming_that_model(tiny_reward_checkpoint, tmp_path):
    from tests.fixtures.models import build_tiny_bert

    no_template = build_tiny_bert(tmp_path / "no-template", chat_template=None, seed=3)
    with ThreadedServer(settings(f"enc={tiny_reward_checkpoint}", f"plain={no_template}")) as server:
        response = httpx.post(server.url + "/score", json={"items": [ITEMS[0], ITEMS[2]]}, timeout=30)
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert (
        detail["loc"] == ["body", "items", 1] and "model 'plain'" in detail["msg"] and "chat template" in detail["msg"]
    )


def test_a_failing_forward_in_one_model_fails_the_request_and_the_service_goes_on(combined, monkeypatch):
    dec = combined.runtime.served.component("dec").engine.batcher

    def broken(batch):
        raise RuntimeError("injected fault in the decoder")

    monkeypatch.setattr(dec, "_forward", broken)
    response = httpx.post(combined.url + "/score", json={"items": ITEMS}, timeout=60)
    assert response.status_code == 500 and "injected fault" in response.text
    monkeypatch.undo()
    assert post(combined, "/score", {"items": ITEMS})["components"]["dec"]
    assert all(e.batcher.queue_depth == 0 for e in combined.runtime.served.engines)
