"""Reward telemetry: what the rewards handed out look like, per model and version, in ``/metrics``.

Four signals an RL operator watches for a reward being drifted from or gamed:

- ``reward_score`` (histogram): every raw score delivered (before any normalization a client asked for), in
  buckets at the training mean ± multiples of the training std (see :func:`score_buckets`); buckets may lie below
  zero, so it has no ``_sum`` or ``_count`` (OpenMetrics): the ``le="+Inf"`` bucket counts;
- ``reward_length_score_correlation``: Pearson's r between an item's token count and its raw score over the last
  ``window`` items; a climb towards +1 during training is the classic sign of the policy buying reward with length;
- ``reward_truncated_items_total`` and ``reward_truncated_window_ratio``: items cut to the model's ``max_length``
  (the reward then judged text it never saw);
- ``reward_score_window_mean`` / ``_std`` against the manifest's training ``normalization``:
  ``reward_score_drift_z`` = (live mean - training mean) / training std, the shift of the live mean in training
  standard deviations, and ``reward_score_std_ratio`` = live std / training std.

Cost on the scoring path: under one lock, two list extends per request, after the scores are computed; the
histogram buckets and the window statistics are computed when ``/metrics`` is scraped. Every series carries
``model`` and ``version`` labels, so several served models each get their own.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Raw reward scales differ between models (a few units for most Bradley-Terry heads, tens for some, hundredths for
# an untrained one), so a model with normalization statistics gets its buckets in training units: the training
# mean plus these many training standard deviations (histogram quantiles then read against training directly).
# Without them the buckets are symmetric around 0, finer near it. The window gauges are exact whatever the buckets.
TRAINING_STEPS = (-4, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 4)
SCORE_BUCKETS = tuple(
    sorted({0.0, *(s * b for b in (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) for s in (-1, 1))})
)


def score_buckets(normalization: Mapping[str, float] | None) -> tuple[float, ...]:
    """The histogram's upper bounds for a model: in training units when its manifest has a std, else fixed."""
    if not normalization or not normalization.get("std"):
        return SCORE_BUCKETS
    mean, std = float(normalization["mean"]), float(normalization["std"])
    return tuple(sorted({mean + k * std for k in TRAINING_STEPS}))


LABELS = ("model", "version")
# Scores wait in a list until the next scrape folds them into the histogram; past this many they are folded at once.
FOLD_EVERY = 65_536


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
    """One model version: the last ``window`` items (raw score, token count, truncated), every score's histogram
    bucket counts (scores since the last fold wait in ``pending``), and the truncated items counted."""

    window: int
    normalization: Mapping[str, float] | None
    recent: deque = field(init=False)
    pending: list[float] = field(default_factory=list)
    bounds: tuple[float, ...] = field(init=False)
    bucket_counts: list[int] = field(init=False)
    score_sum: float = 0.0
    count: int = 0
    truncated: int = 0

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)
        self.bounds = score_buckets(self.normalization)
        self.bucket_counts = [0] * (len(self.bounds) + 1)

    def fold(self) -> None:
        """Count the pending scores into the buckets (under the caller's lock)."""
        if not self.pending:
            return
        import numpy as np

        scores = np.asarray(self.pending, dtype=np.float64)
        # Prometheus buckets are upper bounds, inclusive: a score equal to a bound counts in that bucket.
        index = np.searchsorted(np.asarray(self.bounds), scores, side="left")
        for i, n in enumerate(np.bincount(index, minlength=len(self.bounds) + 1).tolist()):
            self.bucket_counts[i] += n
        self.score_sum += float(scores.sum())
        self.count += len(self.pending)
        self.pending.clear()


class RewardTelemetry(Collector):
    """Observes delivered scores (:meth:`observe`: appends under one lock) and computes everything it exports when
    ``/metrics`` is read."""

    def __init__(self, registry: CollectorRegistry, *, window: int = 1000, enabled: bool = True):
        self.enabled = enabled
        self.window = window
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], _Stream] = {}
        if not enabled:
            return
        Gauge("reward_telemetry_window", "items the window statistics are computed over", registry=registry).set(window)
        registry.register(self)

    def observe(self, model: ModelIdentity, scored: ScoredItems) -> None:
        """Record one request's delivered scores, token counts and truncation flags."""
        if not self.enabled or not scored.scores:
            return
        key = (model.name, model.version)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                norm = dict(model.normalization) if model.normalization else None
                stream = self._streams[key] = _Stream(self.window, norm)
            stream.recent.extend(zip(scored.scores, scored.tokens, scored.truncated, strict=True))
            stream.pending.extend(scored.scores)
            stream.truncated += sum(scored.truncated)
            if len(stream.pending) >= FOLD_EVERY:
                stream.fold()

    # -- Collector: computed at scrape time ----------------------------------------------------------------
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily("reward_score", "raw scores delivered", labels=LABELS)
        truncated_total = CounterMetricFamily(
            "reward_truncated_items", "items cut to the model's max_length before scoring", labels=LABELS
        )
        gauges = {key: GaugeMetricFamily(name, text, labels=LABELS) for key, name, text in WINDOW_GAUGES}
        with self._lock:
            snapshot = []
            for key, stream in self._streams.items():
                stream.fold()
                counts = list(itertools.accumulate(stream.bucket_counts))
                buckets = [(floatToGoString(b), c) for b, c in zip((*stream.bounds, float("inf")), counts, strict=True)]
                totals = (buckets, stream.score_sum, stream.truncated)
                snapshot.append((key, list(stream.recent), stream.normalization, totals))
        for key, recent, normalization, (buckets, score_sum, truncated) in snapshot:
            labels = list(key)
            histogram.add_metric(labels, buckets, score_sum)
            truncated_total.add_metric(labels, truncated)
            gauges["items"].add_metric(labels, len(recent))
            if recent:
                _window_statistics(gauges, labels, recent, normalization)
        yield histogram
        yield truncated_total
        yield from gauges.values()


# (key, name, help) of the gauges computed over the window at scrape time.
WINDOW_GAUGES = (
    ("items", "reward_telemetry_window_items", "items in the window the statistics below are computed over"),
    ("mean", "reward_score_window_mean", "mean raw score over the window"),
    ("std", "reward_score_window_std", "standard deviation of the raw scores over the window"),
    (
        "corr",
        "reward_length_score_correlation",
        "Pearson correlation of token count and raw score over the window (absent while either is constant)",
    ),
    ("truncated", "reward_truncated_window_ratio", "share of the window's items cut to max_length"),
    (
        "drift",
        "reward_score_drift_z",
        "(window mean - training mean) / training std, from the manifest's normalization",
    ),
    ("spread", "reward_score_std_ratio", "window std / training std, from the manifest's normalization"),
    ("train_mean", "reward_score_training_mean", "the manifest's normalization mean (raw scores)"),
    ("train_std", "reward_score_training_std", "the manifest's normalization std (raw scores)"),
)


def _window_statistics(
    gauges: Mapping[str, GaugeMetricFamily],
    labels: list[str],
    recent: list[tuple[float, int, bool]],
    normalization: Mapping[str, float] | None,
) -> None:
    import numpy as np

    data = np.asarray(recent, dtype=np.float64)
    scores, tokens, cut = data[:, 0], data[:, 1], data[:, 2]
    mean, std = float(scores.mean()), float(scores.std())
    gauges["mean"].add_metric(labels, mean)
    gauges["std"].add_metric(labels, std)
    gauges["truncated"].add_metric(labels, float(cut.mean()))
    if std > 0 and float(tokens.std()) > 0:
        gauges["corr"].add_metric(labels, float(np.corrcoef(tokens, scores)[0, 1]))
    if normalization and normalization.get("std"):
        train_mean, train_std = float(normalization["mean"]), float(normalization["std"])
        gauges["train_mean"].add_metric(labels, train_mean)
        gauges["train_std"].add_metric(labels, train_std)
        gauges["drift"].add_metric(labels, (mean - train_mean) / train_std)
        gauges["spread"].add_metric(labels, std / train_std)
