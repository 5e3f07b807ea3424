"""Reward telemetry: what the rewards handed out look like, per model and version, in ``/metrics``.

Four signals an RL operator watches for a reward being drifted from or gamed:

- ``reward_score`` (histogram): every raw score delivered (before any normalization a client asked for);
- ``reward_length_score_correlation``: Pearson's r between an item's token count and its raw score over the last
  ``window`` items; a climb towards +1 during training is the classic sign of the policy buying reward with length;
- ``reward_truncated_items_total`` and ``reward_truncated_window_ratio``: items cut to the model's ``max_length``
  (the reward then judged text it never saw);
- ``reward_score_window_mean`` / ``_std`` against the manifest's training ``normalization``:
  ``reward_score_drift_z`` = (live mean - training mean) / training std, the shift of the live mean in training
  standard deviations, and ``reward_score_std_ratio`` = live std / training std.

Cost on the scoring path: one lock, a deque extend and a histogram observation per item, after the scores are
computed. The window statistics are computed only when ``/metrics`` is scraped. Every series carries ``model`` and
``version`` labels, so several served models each get their own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Raw reward scales differ between models (a few units for most Bradley-Terry heads, tens for some); the buckets
# are symmetric around 0 and finer near it. The window mean and std gauges are exact whatever the scale.
SCORE_BUCKETS = tuple(
    sorted({0.0, *(s * b for b in (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) for s in (-1, 1))})
)
LABELS = ("model", "version")


class ModelIdentity(Protocol):
    name: str
    version: str
    normalization: Mapping[str, float] | None


class ScoredItems(Protocol):
    scores: Sequence[float]
    truncated: Sequence[bool]
    tokens: Sequence[int]


@dataclass
class _Stream:
    """The last ``window`` items of one model version: (raw score, token count, truncated)."""

    window: int
    normalization: Mapping[str, float] | None
    recent: deque = field(init=False)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)


class RewardTelemetry(Collector):
    """Observes delivered scores (:meth:`observe`) and exports the window statistics when ``/metrics`` is read."""

    def __init__(self, registry: CollectorRegistry, *, window: int = 1000, enabled: bool = True):
        self.enabled = enabled
        self.window = window
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._children: dict[tuple[str, str], tuple[Histogram, Counter]] = {}
        if not enabled:
            return
        self.scores = Histogram(
            "reward_score", "raw scores delivered", LABELS, buckets=SCORE_BUCKETS, registry=registry
        )
        self.truncated = Counter(
            "reward_truncated_items", "items cut to the model's max_length before scoring", LABELS, registry=registry
        )
        self.window_size = Gauge(
            "reward_telemetry_window", "items the window statistics are computed over", registry=registry
        )
        self.window_size.set(window)
        registry.register(self)

    def observe(self, model: ModelIdentity, scored: ScoredItems) -> None:
        """Record one request's delivered scores, token counts and truncation flags."""
        if not self.enabled or not scored.scores:
            return
        key = (model.name, model.version)
        children = self._children.get(key)
        if children is None:
            children = self._register(key, model.normalization)
        histogram, truncated = children
        for score in scored.scores:
            histogram.observe(score)
        cut = sum(scored.truncated)
        if cut:
            truncated.inc(cut)
        stream = self._streams[key]
        with self._lock:
            stream.recent.extend(zip(scored.scores, scored.tokens, scored.truncated, strict=True))

    def _register(self, key: tuple[str, str], normalization: Mapping[str, float] | None) -> tuple[Histogram, Counter]:
        with self._lock:
            if key not in self._children:
                self._streams[key] = _Stream(self.window, dict(normalization) if normalization else None)
                self._children[key] = (self.scores.labels(*key), self.truncated.labels(*key))
            return self._children[key]

    # -- Collector: computed at scrape time ----------------------------------------------------------------
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import numpy as np

        families = {
            "items": GaugeMetricFamily(
                "reward_telemetry_window_items",
                "items in the window the statistics below are computed over",
                labels=LABELS,
            ),
            "mean": GaugeMetricFamily("reward_score_window_mean", "mean raw score over the window", labels=LABELS),
            "std": GaugeMetricFamily(
                "reward_score_window_std", "standard deviation of the raw scores over the window", labels=LABELS
            ),
            "corr": GaugeMetricFamily(
                "reward_length_score_correlation",
                "Pearson correlation of token count and raw score over the window (absent while either is constant)",
                labels=LABELS,
            ),
            "truncated": GaugeMetricFamily(
                "reward_truncated_window_ratio", "share of the window's items cut to max_length", labels=LABELS
            ),
            "drift": GaugeMetricFamily(
                "reward_score_drift_z",
                "(window mean - training mean) / training std, from the manifest's normalization",
                labels=LABELS,
            ),
            "spread": GaugeMetricFamily(
                "reward_score_std_ratio", "window std / training std, from the manifest's normalization", labels=LABELS
            ),
            "train_mean": GaugeMetricFamily(
                "reward_score_training_mean", "the manifest's normalization mean (raw scores)", labels=LABELS
            ),
            "train_std": GaugeMetricFamily(
                "reward_score_training_std", "the manifest's normalization std (raw scores)", labels=LABELS
            ),
        }
        with self._lock:
            snapshot = [(key, list(s.recent), s.normalization) for key, s in self._streams.items()]
        for key, recent, normalization in snapshot:
            labels = list(key)
            families["items"].add_metric(labels, len(recent))
            if not recent:
                continue
            data = np.asarray(recent, dtype=np.float64)
            scores, tokens, cut = data[:, 0], data[:, 1], data[:, 2]
            mean, std = float(scores.mean()), float(scores.std())
            families["mean"].add_metric(labels, mean)
            families["std"].add_metric(labels, std)
            families["truncated"].add_metric(labels, float(cut.mean()))
            if std > 0 and float(tokens.std()) > 0:
                families["corr"].add_metric(labels, float(np.corrcoef(tokens, scores)[0, 1]))
            if normalization and normalization.get("std"):
                train_mean, train_std = float(normalization["mean"]), float(normalization["std"])
                families["train_mean"].add_metric(labels, train_mean)
                families["train_std"].add_metric(labels, train_std)
                families["drift"].add_metric(labels, (mean - train_mean) / train_std)
                families["spread"].add_metric(labels, std / train_std)
        yield from families.values()
