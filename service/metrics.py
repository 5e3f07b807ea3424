"""Prometheus metrics, on a registry private to one app (several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.batching import BatchReport

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    """The service's metrics; also the batcher's observer (one report per forward pass)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "reward_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.request_duration = Histogram(
            "reward_request_duration_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "reward_queue_wait_seconds",
            "time an item waited in the queue before its forward pass",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_duration = Histogram(
            "reward_forward_seconds", "duration of one forward pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("reward_batch_size", "items per forward pass", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "reward_batch_tokens",
            "padded tokens per forward pass (longest x items)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_real_tokens = Histogram(
            "reward_batch_real_tokens",
            "real (unpadded) tokens per forward pass; padding efficiency = "
            "reward_batch_real_tokens_sum / reward_batch_tokens_sum",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("reward_queue_depth", "items waiting for a forward pass", registry=r)
        self.queue_tokens = Gauge("reward_queue_tokens", "tokens waiting for a forward pass", registry=r)
        self.scored_items = Counter("reward_scored_items", "items scored", registry=r)
        self.forward_failures = Counter("reward_forward_failures", "forward passes that raised", registry=r)
        self.rejected = Counter(
            "reward_rejected_requests", "scoring requests refused or abandoned, by reason", ["reason"], registry=r
        )
        self.in_flight = Gauge(
            "reward_requests_in_flight", "scoring requests accepted and not yet answered", registry=r
        )
        self.inference_workers = Gauge(
            "reward_inference_workers", "inference worker threads, each running its own forward passes", registry=r
        )
        self.fast_graph_missing = Gauge(
            "reward_fast_graph_missing",
            "1 when the model's architecture has a fast ONNX graph that it is not served with (slower scoring; "
            "/info's batching.fast_graph_missing and the log say why)",
            registry=r,
        )
        self.ready = Gauge("reward_ready", "1 when the model is loaded and warmed up and not draining", registry=r)
        self._models: Info | None = None  # created when described: labelled by component when several are served
        self._tokens_scored = 0.0  # real tokens of the forwards that succeeded (for a backend that shares nothing)
        self._sharing: Callable[[], object] | None = None
        r.register(_SharingCollector(self))

    def watch_sharing(self, stats: Callable[[], object] | None) -> None:
        """Read the prefix-sharing forward's counters (``service.shared_forward.SharingStats``) at each scrape; without
        one, every token scored is a token computed."""
        self._sharing = stats

    def watch_queue(self, depth: Callable[[], float], tokens: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.queue_tokens.set_function(tokens)

    def describe_model(
        self, *, model: str, version: str, dtype: str, device: str, component: str | None = None
    ) -> None:
        """The ``reward_model`` info: the one model served, or (``component`` given) one of several."""
        if self._models is None:
            labels = ["component"] if component is not None else []
            self._models = Info("reward_model", "the model being served", labels, registry=self.registry)
        info = self._models.labels(component=component) if component is not None else self._models
        info.info({"model": model, "version": version, "dtype": dtype, "device": device})

    # -- BatchObserver -------------------------------------------------------------------------------------
    def batch_done(self, report: BatchReport) -> None:
        self.forward_duration.observe(report.forward_s)
        self.batch_size.observe(report.items)
        self.batch_tokens.observe(report.padded_tokens)
        self.batch_real_tokens.observe(report.real_tokens)
        for wait in report.queue_waits_s:
            self.queue_wait.observe(wait)
        if report.ok:
            self.scored_items.inc(report.items)
            self._tokens_scored += report.real_tokens
        else:
            self.forward_failures.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def summed_sharing(stats: list[Callable[[], Any] | None], metrics: ServiceMetrics) -> Callable[[], Any] | None:
    """For several models: the prefix cache counters summed over those that share prefixes, and every token scored
    (all forwards) less those their sharing saved."""
    present = [s for s in stats if s is not None]
    if not present:
        return None

    def read() -> Any:
        parts = [s() for s in present]
        total = {f: sum(getattr(p, f) for p in parts) for f in _SHARING_FIELDS}
        saved = total["tokens_scored"] - total["tokens_computed"]
        total["tokens_scored"] = metrics._tokens_scored
        total["tokens_computed"] = metrics._tokens_scored - saved
        return SimpleNamespace(**total)

    return read


_SHARING_FIELDS = (
    "tokens_scored",
    "tokens_computed",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "cache_bytes",
    "cache_entries",
    "cache_capacity_bytes",
)


class _SharingCollector:
    """Tokens scored vs tokens computed, and the prefix cache's counters, read from the forward when scraped."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def describe(self) -> list:
        return []  # read at scrape time only: the forward may not exist yet

    def collect(self):
        stats = self.metrics._sharing() if self.metrics._sharing is not None else None
        scored = getattr(stats, "tokens_scored", self.metrics._tokens_scored)
        computed = getattr(stats, "tokens_computed", self.metrics._tokens_scored)
        yield CounterMetricFamily("reward_tokens_scored", "tokens of the items scored", value=scored)
        yield CounterMetricFamily(
            "reward_tokens_computed",
            "tokens run through the model: fewer than reward_tokens_scored when prompt prefixes are shared",
            value=computed,
        )
        if stats is None:
            return
        for name, help_text in (
            ("hits", "lookups that found a computed prefix"),
            ("misses", "lookups that found none"),
            ("evictions", "entries dropped to make room"),
        ):
            yield CounterMetricFamily(
                f"reward_prefix_cache_{name}", f"prefix cache {help_text}", value=getattr(stats, f"cache_{name}")
            )
        yield GaugeMetricFamily("reward_prefix_cache_bytes", "memory held by cached prefixes", value=stats.cache_bytes)
        yield GaugeMetricFamily("reward_prefix_cache_entries", "cached prefixes", value=stats.cache_entries)
        yield GaugeMetricFamily(
            "reward_prefix_cache_capacity_bytes",
            "the prefix cache's limit (--prefix-cache-mb)",
            value=stats.cache_capacity_bytes,
        )
