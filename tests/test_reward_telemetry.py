"""Reward telemetry in /metrics: values on known streams, read back with prometheus-client's parser from real servers.

A stream whose scores are a known function of length (a backend that answers ``base + slope * (tokens - centre)``)
gives a correlation of known sign and a drift of known size; the real tiny model gives values checked against the
same statistics computed from the scores the service answered. The dashboard and the alert rules are checked to
plot and watch series the service really exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry import TRAINING_STEPS
from tests.fixtures.commands import REPO
from tests.fixtures.models import NORMALIZATION
from tests.fixtures.servers import ServerProcess, ThreadedServer, make_settings, metric_value

MONITORING = REPO / "k8s" / "overlays" / "monitoring"
WINDOW = 20


def items(texts: list[str]) -> list[dict[str, str]]:
    return [{"text": t} for t in texts]


def texts_of_lengths(count: int) -> list[str]:
    return [" ".join(["water"] * (k + 1)) for k in range(count)]


class LinearBackend:
    """The tiny checkpoint's tokenizer and identity; scores set by the test: ``base + slope * (tokens - centre)``."""

    def __init__(self, checkpoint_dir: Path):
        from service.backend import CheckpointBackend

        self.real = CheckpointBackend.load(checkpoint_dir, device="cpu", backend="torch")
        self.formatter = self.real.formatter
        self.info = self.real.info
        self.base, self.slope, self.centre = 0.0, 0.0, 0.0

    def warm_up(self) -> None:
        pass

    def forward(self, batch: list[list[int]]) -> list[float]:
        return [self.base + self.slope * (len(ids) - self.centre) for ids in batch]


def gauges(text: str, model: str) -> dict[str, float]:
    """Every sample of the scrape labelled with this model, by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == model and "le" not in sample.labels
    }


def delivered(text: str, labels: dict[str, str] | None = None) -> float:
    """Items in the score histogram: its +Inf bucket (a histogram with negative buckets has no _count or _sum)."""
    return metric_value(text, "reward_score_bucket", {**(labels or {}), "le": "+Inf"})


@pytest.fixture(scope="module")
def linear(tiny_reward_checkpoint):
    backend = LinearBackend(tiny_reward_checkpoint)
    settings = make_settings(tiny_reward_checkpoint, reward_telemetry_window=WINDOW, inference_workers=1)
    with ThreadedServer(settings, backend) as server:
        yield backend, server


def test_known_correlation_sign_and_drift_size(linear):
    backend, server = linear
    texts = texts_of_lengths(WINDOW)
    lengths = [len(backend.formatter.encode({"text": t}).input_ids) for t in texts]
    assert len(set(lengths)) == WINDOW
    mean, std = NORMALIZATION["mean"], NORMALIZATION["std"]
    backend.centre = sum(lengths) / len(lengths)
    model, version = backend.info.name, backend.info.version
    for slope, drift in ((0.1, 1.5), (-0.3, -0.5)):  # the second stream replaces the first in the window
        backend.base, backend.slope = mean + drift * std, slope
        for start in range(0, WINDOW, 7):  # several requests, one window
            r = httpx.post(f"{server.url}/score", json={"items": items(texts[start : start + 7])}, timeout=30)
            assert r.status_code == 200, r.text
        got = gauges(httpx.get(f"{server.url}/metrics").text, model)
        assert got["reward_telemetry_window_items"] == WINDOW
        assert got["reward_length_score_correlation"] == pytest.approx(1.0 if slope > 0 else -1.0, abs=1e-9)
        assert got["reward_score_drift_z"] == pytest.approx(drift, abs=1e-9)
        assert got["reward_score_window_mean"] == pytest.approx(mean + drift * std, abs=1e-9)
        assert got["reward_score_std_ratio"] == pytest.approx(abs(slope) * np.std(lengths) / std, rel=1e-9)
        assert (got["reward_score_training_mean"], got["reward_score_training_std"]) == (mean, std)
    text = httpx.get(f"{server.url}/metrics").text
    labels = {"model": model, "version": version}
    assert delivered(text, labels) == 2 * WINDOW  # the histogram keeps every item
    assert metric_value(text, "reward_truncated_window_ratio", labels) == 0.0


def test_compare_pairs_are_observed_as_items(linear):
    backend, server = linear
    before = delivered(httpx.get(f"{server.url}/metrics").text)
    pair = {"prompt": "why ?", "chosen": "water water", "rejected": "water"}
    assert httpx.post(f"{server.url}/compare", json={"pairs": [pair, pair]}, timeout=30).status_code == 200
    assert delivered(httpx.get(f"{server.url}/metrics").text) == before + 4


# -- the real model, through the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_server(tiny_reward_checkpoint):
    process = ServerProcess(["--model", str(tiny_reward_checkpoint), "--reward-telemetry-window", "50"]).start(
        ready_timeout=180
    )
    yield process
    process.stop()


@pytest.mark.slow  # reward-serve as a subprocess
def test_real_scores_match_the_statistics_of_what_was_answered(real_server, tiny_reward_checkpoint):
    from training.checkpoint import load_tokenizer, read_manifest
    from training.formatting import Formatter, FormattingRecipe

    recipe = FormattingRecipe.from_dict(read_manifest(tiny_reward_checkpoint)["formatting"])
    formatter = Formatter(load_tokenizer(tiny_reward_checkpoint), recipe)
    texts = [f"{t} please ." for t in texts_of_lengths(30)] + ["water " * 200]  # the last is cut to max_length
    body = httpx.post(f"{real_server.url}/score", json={"items": items(texts)}, timeout=60).json()
    scores = np.asarray(body["scores"])
    lengths = np.asarray([len(formatter.encode({"text": t}).input_ids) for t in texts])
    assert body["truncated"] == [False] * 30 + [True]
    text = httpx.get(f"{real_server.url}/metrics").text
    got = gauges(text, body["model"])
    assert got["reward_telemetry_window_items"] == 31
    assert got["reward_length_score_correlation"] == pytest.approx(np.corrcoef(lengths, scores)[0, 1], abs=1e-9)
    assert got["reward_score_window_mean"] == pytest.approx(scores.mean(), abs=1e-9)
    assert got["reward_score_window_std"] == pytest.approx(scores.std(), abs=1e-9)
    expected_z = (scores.mean() - NORMALIZATION["mean"]) / NORMALIZATION["std"]
    assert got["reward_score_drift_z"] == pytest.approx(expected_z, abs=1e-9)
    assert got["reward_truncated_window_ratio"] == pytest.approx(1 / 31)
    assert got["reward_truncated_items_total"] == 1
    assert delivered(text, {"model": body["model"]}) == 31
    buckets = {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "reward_score_bucket"
    }
    training_units = [NORMALIZATION["mean"] + k * NORMALIZATION["std"] for k in TRAINING_STEPS]
    assert sorted(buckets) == pytest.approx([*training_units, float("inf")])  # the manifest's mean +- k std
    for bound, count in buckets.items():
        assert count == int((scores <= bound).sum()), bound  # cumulative, upper bounds inclusive


def test_switched_off_it_exports_nothing(tiny_reward_checkpoint):
    settings = make_settings(tiny_reward_checkpoint, reward_telemetry=False, inference_workers=1)
    with ThreadedServer(settings) as server:
        assert httpx.post(f"{server.url}/score", json={"items": items(["water"])}, timeout=30).status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "reward_scored_items_total") == 1
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "reward_scored_items" in families
    telemetry = {"reward_score", "reward_truncated_items", "reward_length_score_correlation", "reward_score_drift_z"}
    assert not families & telemetry


# -- the dashboard and the alert rules watch series that exist -----------------------------------------------------
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported_names(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def referenced(expression: str) -> set[str]:
    return set(re.findall(r"\breward_[a-z_]+\b", expression))


@pytest.mark.slow  # reward-serve as a subprocess
def test_dashboard_and_alerts_use_exported_series(real_server):
    exported = exported_names(httpx.get(f"{real_server.url}/metrics").text)
    dashboard = json.loads((MONITORING / "reward-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    exprs += [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    names = set().union(*map(referenced, exprs))
    assert {"reward_score_drift_z", "reward_length_score_correlation", "reward_score_bucket"} <= names
    missing = sorted(n for n in names if n not in exported)
    assert not missing, f"the dashboard or the alerts use series the service does not export: {missing}"


def test_committed_dashboard_is_what_grafanalib_builds():
    """The JSON is generated by grafanalib (k8s/overlays/monitoring/dashboard.py), whose attrs validators check
    every panel and target; the committed file must be that output."""
    import runpy

    module = runpy.run_path(str(MONITORING / "dashboard.py"))
    assert json.loads(module["render"]()) == json.loads((MONITORING / "reward-dashboard.json").read_text())
