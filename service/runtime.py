"""What the routes share, on ``app.state.runtime``: settings, lifecycle, metrics, and once loaded what is served
(:class:`~service.combined.Served`: one :class:`~service.engine.Engine` per reward model) and the
:class:`~service.scoring.ScoringService` that every protocol calls."""

from __future__ import annotations

import logging
import threading
import time

from service.backend import ScoringBackend
from service.combined import ComponentFailed, Served, build_served
from service.engine import Engine
from service.errors import Unavailable
from service.lifecycle import Lifecycle, refusal
from service.metrics import ServiceMetrics, summed_sharing
from service.scoring import ScoringService
from service.settings import ServeSettings
from service.telemetry import RewardTelemetry

logger = logging.getLogger("reward.service")


class ServiceRuntime:
    """Settings, lifecycle and metrics from the start; the engine and the scoring service once loaded, published
    together before the service turns ready and never changed afterwards."""

    def __init__(self, settings: ServeSettings, backend: ScoringBackend | None = None):
        self.settings = settings
        self.lifecycle = Lifecycle(settings.drain_timeout_s)
        self.metrics = ServiceMetrics()
        self.telemetry = RewardTelemetry(
            self.metrics.registry, window=settings.reward_telemetry_window, enabled=settings.reward_telemetry
        )
        self._backend = backend  # a ready-made backend (tests inject faults this way); else loaded from settings
        self._served: Served | None = None
        self._scoring: ScoringService | None = None
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self.metrics.in_flight.set_function(lambda: self.lifecycle.accepted)
        self.metrics.ready.set_function(lambda: 1.0 if self.lifecycle.ready else 0.0)
        self.metrics.watch_queue(
            lambda: sum(e.batcher.queue_depth for e in self._engines()),
            lambda: sum(e.batcher.queued_tokens for e in self._engines()),
        )

    @property
    def served(self) -> Served:
        """What is served (every component's engine); before it is published, the refusal of the phase the service
        is in (503)."""
        if self._served is None:
            raise self._not_loaded()
        return self._served

    @property
    def engine(self) -> Engine:
        """The (first) component's engine."""
        return self.served.engines[0]

    def _engines(self) -> list[Engine]:
        return self._served.engines if self._served is not None else []

    @property
    def scoring(self) -> ScoringService:
        if self._scoring is None:
            raise self._not_loaded()
        return self._scoring

    def _not_loaded(self) -> Unavailable:
        return refusal(self.lifecycle.phase)

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
            served = build_served(s, self._backend, observer=self.metrics)
            self._publish(served)
            for component in served.components:
                _log_loaded(component.engine, s, time.perf_counter() - started)
            if served.combination is not None:
                logger.info("serving %r: %s", served.model.name, served.combination.describe())
            self.lifecycle.mark_ready()
        except ComponentFailed as exc:  # the message names the component
            logger.exception("failed to load the reward models")
            self.lifecycle.mark_failed(str(exc))
        except Exception as exc:  # reported by /healthz, /readyz and the CLI's exit status
            logger.exception("failed to load the reward model from %s", s.components[0][1])
            self.lifecycle.mark_failed(f"{exc.__class__.__name__}: {exc}")
        finally:
            self._loaded.set()

    def _publish(self, served: Served) -> None:
        engines = served.engines
        self.metrics.inference_workers.set(sum(e.threads.workers for e in engines))
        stats = [getattr(getattr(e.backend, "runner", None), "stats", None) for e in engines]
        self.metrics.watch_sharing(stats[0] if len(stats) == 1 else summed_sharing(stats, self.metrics))
        if served.several:
            for c in served.components:
                self.metrics.describe_model(
                    model=c.engine.info.name,
                    version=c.info.version,
                    dtype=c.info.dtype,
                    device=c.info.device,
                    component=c.name,
                )
        else:
            info = served.model
            self.metrics.describe_model(model=info.name, version=info.version, dtype=info.dtype, device=info.device)
        missing = any(e.info.extra.get("fast_graph_missing") for e in engines)
        self.metrics.fast_graph_missing.set(1 if missing else 0)
        self._scoring = ScoringService(served, self.lifecycle, self.settings, self.telemetry)
        self._served = served

    def refuse_waiting(self) -> None:
        """The drain's last call: answer what still waits for a forward with 503 now."""
        refused = sum(e.batcher.refuse_waiting() for e in self._engines())
        if refused:
            logger.warning("drain deadline near: refused %d request(s) still waiting (503, Retry-After)", refused)

    def shut_down(self) -> None:
        """Stop admitting, let the workers finish what is queued, end them."""
        self.lifecycle.begin_drain()
        for engine in self._engines():
            if not engine.batcher.stop(timeout=max(1.0, self.lifecycle.drain_time_left())):
                logger.error("the inference worker did not finish within the drain timeout")
        logger.info("reward service stopped")


def _log_loaded(engine: Engine, s: ServeSettings, seconds: float) -> None:
    info, limits, threads = engine.info, engine.limits, engine.threads
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
