"""What the routes share, on ``app.state.runtime``: settings, lifecycle, metrics, and (once loaded) the backend,
batcher, scorer and the :class:`~service.scoring.ScoringService` that every protocol calls."""

from __future__ import annotations

import logging
import threading
import time

from service.backend import CheckpointBackend, ModelInfo, ScoringBackend, ThreadPlan, plan_threads
from service.batching import Batcher, BatchLimits
from service.errors import Unavailable
from service.lifecycle import Lifecycle
from service.metrics import ServiceMetrics
from service.scoring import Scorer, ScoringService
from service.settings import ServeSettings

logger = logging.getLogger("reward.service")


class ServiceRuntime:
    """What the routes share: settings, lifecycle, metrics, and (once loaded) the backend, batcher and scorer."""

    def __init__(self, settings: ServeSettings, backend: ScoringBackend | None):
        self.settings = settings
        self.lifecycle = Lifecycle(settings.drain_timeout_s)
        self.metrics = ServiceMetrics()
        self.backend = backend
        self.batcher: Batcher | None = None
        self.scorer: Scorer | None = None
        self.scoring = ScoringService(self)
        self.threads: ThreadPlan | None = None  # inference workers and their torch threads, once planned
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self.metrics.in_flight.set_function(lambda: self.lifecycle.accepted)
        self.metrics.ready.set_function(lambda: 1.0 if self.lifecycle.ready else 0.0)
        self.metrics.watch_queue(
            lambda: self.batcher.queue_depth if self.batcher else 0,
            lambda: self.batcher.queued_tokens if self.batcher else 0,
        )

    @property
    def limits(self) -> BatchLimits:
        """The batcher's limits; the default token budget depends on the loaded model's device and dtype."""
        s = self.settings
        device, dtype = (self.backend.info.device, self.backend.info.dtype) if self.backend else (s.device, s.dtype)
        return BatchLimits(
            s.batch_tokens_for(device, dtype),
            s.max_batch_size,
            s.max_wait_ms / 1000.0,
            s.max_queue_tokens,
            s.batch_overhead_tokens,
            s.batch_window_items if s.batch_window_items is not None else self._default_window(),
        )

    def _default_window(self) -> int:
        """First come, first served when nothing is padded (a text's wait then depends only on its arrival);
        grouping by length where batches are padded."""
        pads = getattr(self.backend, "pads_batches", True)
        return 0 if pads else 1

    @property
    def info(self) -> ModelInfo:
        if self.backend is None:
            raise Unavailable("the model is still loading", retry_after_s=5)
        return self.backend.info

    # -- startup and shutdown ------------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="reward-loader", daemon=True)
        self._loader.start()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """True once loading ended (ready or failed)."""
        return self._loaded.wait(timeout)

    def _load(self) -> None:
        s = self.settings
        try:
            started = time.perf_counter()
            from training.checkpoint import resolve_device

            self.threads = threads = plan_threads(resolve_device(s.device), s.inference_workers, s.torch_threads)
            threads.apply()  # loading and warm-up run as each worker will
            if self.backend is None:
                logger.info("loading reward model from %s (dtype %s, device %s)", s.model, s.dtype, s.device)
                self.backend = CheckpointBackend.load(
                    s.model,
                    dtype=s.dtype,
                    device=s.device,
                    reward_label=s.reward_label,
                    max_length=s.max_length,
                    truncation_side=s.truncation_side,
                    backend=s.backend,
                )
            self.backend.warm_up()
            info = self.backend.info
            self.batcher = Batcher(
                self.backend.forward,
                self.limits,
                observer=self.metrics,
                workers=threads.workers,
                on_worker_start=threads.apply,
            ).start()
            self.metrics.inference_workers.set(threads.workers)
            self.scorer = Scorer(self.backend.formatter, self.batcher, request_timeout_s=s.request_timeout_s)
            self.metrics.describe_model(model=info.name, version=info.version, dtype=info.dtype, device=info.device)
            _log_loaded(info, self.limits, threads, s, time.perf_counter() - started)
            self.lifecycle.mark_ready()
        except Exception as exc:  # reported by /healthz, /readyz and the CLI's exit status
            logger.exception("failed to load the reward model from %s", s.model)
            self.lifecycle.mark_failed(f"{exc.__class__.__name__}: {exc}")
        finally:
            self._loaded.set()

    def shut_down(self) -> None:
        """Stop admitting, let the worker finish what is queued, end it."""
        self.lifecycle.begin_drain()
        if self.batcher is not None and not self.batcher.stop(timeout=max(1.0, self.lifecycle.drain_time_left())):
            logger.error("the inference worker did not finish within the drain timeout")
        logger.info("reward service stopped")


def _log_loaded(info: ModelInfo, limits: BatchLimits, threads: ThreadPlan, s: ServeSettings, seconds: float) -> None:
    recipe = info.formatting
    logger.info(
        "loaded reward model %r version %s from %s in %.1f s (%s) on device %s, dtype %s, backend %s; reward label %s",
        info.name,
        info.version,
        info.source,
        seconds,
        "manifest: served as trained" if info.has_manifest else "no manifest: default formatting",
        info.device,
        info.dtype,
        info.extra.get("backend", "custom"),
        info.reward_label,
    )
    logger.info(
        "formatting: %s, max_length %s, truncation %s, eos appended %s; normalization %s",
        recipe.get("architecture"),
        recipe.get("max_length"),
        recipe.get("truncation_side"),
        recipe.get("append_eos"),
        info.normalization or "none",
    )
    logger.info(
        "batching: max_batch_tokens %d, max_batch_size %d, max_wait %.1f ms, max_queue_tokens %d, overhead_tokens %d, "
        "window_items %d; "
        "inference workers %d, torch threads each %s; "
        "limits: %d items/request, %d body bytes, %d chars/text, timeout %g s; api key %s",
        limits.max_batch_tokens,
        limits.max_batch_size,
        limits.max_wait_s * 1000,
        limits.max_queue_tokens,
        limits.overhead_tokens,
        limits.window_items,
        threads.workers,
        threads.threads_per_worker or "torch's choice",
        s.max_items_per_request,
        s.max_body_bytes,
        s.max_text_chars,
        s.request_timeout_s,
        "required" if s.api_key is not None else "not required",
    )
