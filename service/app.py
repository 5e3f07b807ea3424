"""The HTTP app. Routes stay thin: validate -> check limits -> :class:`~service.scoring.Scorer` -> respond.

``create_app(settings)`` loads the checkpoint in a background thread at startup (so /healthz answers and /readyz
says 503 while it loads and warms up); ``create_app(settings, backend)`` serves any object with the
:class:`~service.backend.ScoringBackend` shape instead (tests use this for fault injection).
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.backend import CheckpointBackend, ModelInfo, ScoringBackend, ThreadPlan, plan_threads
from service.batching import Batcher, BatchLimits
from service.errors import InvalidInput, ServiceError, Unauthorized, Unavailable, json_safe
from service.lifecycle import Lifecycle, Phase
from service.metrics import ServiceMetrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.schemas import (
    CompareRequest,
    CompareResponse,
    GetRewardRequest,
    GetRewardResponse,
    InfoResponse,
    ScoreRequest,
    ScoreResponse,
)
from service.scoring import Scorer, check_limits
from service.settings import ServeSettings
from training.checkpoint import normalize
from training.formatting import FormattingError, pair_side

logger = logging.getLogger("reward.service")

ROUTES = frozenset({"/score", "/compare", "/get_reward", "/healthz", "/readyz", "/info", "/metrics"})

# The refusals a scoring route can answer besides FastAPI's own 422, for the OpenAPI schema: {"detail": message}.
_ERROR = {
    "content": {
        "application/json": {"schema": {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}}
    }
}
SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body could not be read (not UTF-8, numbers too large, nested too deeply)", **_ERROR},
    401: {"description": "the API key is missing or wrong (only when the service has one)", **_ERROR},
    413: {
        "description": "the body is over --max-body-bytes, or the request alone holds more tokens than the queue",
        **_ERROR,
    },
    429: {"description": "the queue is full; come back after Retry-After seconds", **_ERROR},
    500: {"description": "the forward pass over this request's batch failed", **_ERROR},
    503: {"description": "still loading, or shutting down; see Retry-After", **_ERROR},
    504: {"description": "not answered within --request-timeout-s", **_ERROR},
}


class ServiceRuntime:
    """What the routes share: settings, lifecycle, metrics, and (once loaded) the backend, batcher and scorer."""

    def __init__(self, settings: ServeSettings, backend: ScoringBackend | None):
        self.settings = settings
        self.lifecycle = Lifecycle(settings.drain_timeout_s)
        self.metrics = ServiceMetrics()
        self.backend = backend
        self.batcher: Batcher | None = None
        self.scorer: Scorer | None = None
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
        )

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
        if self.batcher is not None:
            if not self.batcher.stop(timeout=max(1.0, self.lifecycle.drain_time_left())):
                logger.error("the inference worker did not finish within the drain timeout")
        logger.info("reward service stopped")


def _log_loaded(info: ModelInfo, limits: BatchLimits, threads: ThreadPlan, s: ServeSettings, seconds: float) -> None:
    recipe = info.formatting
    logger.info(
        "loaded reward model %r version %s from %s in %.1f s (%s) on device %s, dtype %s; reward label %s",
        info.name,
        info.version,
        info.source,
        seconds,
        "manifest: served as trained" if info.has_manifest else "no manifest: default formatting",
        info.device,
        info.dtype,
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
        "batching: max_batch_tokens %d, max_batch_size %d, max_wait %.1f ms, max_queue_tokens %d, overhead_tokens %d; "
        "inference workers %d, torch threads each %s; "
        "limits: %d items/request, %d body bytes, %d chars/text, timeout %g s; api key %s",
        limits.max_batch_tokens,
        limits.max_batch_size,
        limits.max_wait_s * 1000,
        limits.max_queue_tokens,
        limits.overhead_tokens,
        threads.workers,
        threads.threads_per_worker or "torch's choice",
        s.max_items_per_request,
        s.max_body_bytes,
        s.max_text_chars,
        s.request_timeout_s,
        "required" if s.api_key is not None else "not required",
    )


def create_app(settings: ServeSettings, backend: ScoringBackend | None = None) -> FastAPI:
    runtime = ServiceRuntime(settings, backend)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime.start_loading()
        try:
            yield
        finally:
            runtime.shut_down()

    app = FastAPI(
        title="Reward model service",
        summary="Scores texts with a reward model, batching items across requests.",
        version="0.1.0",
        lifespan=lifespan,
        strict_content_type=False,  # a JSON body without a content-type header is still read as JSON
        # Off unless asked: even with no provider configured, FastAPI looks the providers up on every request.
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=runtime.metrics, routes=ROUTES)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 429 or exc.status_code == 413:
            runtime.metrics.rejected.labels(reason=exc.kind).inc()
        return JSONResponse({"detail": json_safe(exc.detail())}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, but rendered safely: its errors echo the input, which may hold NaN, lone surrogates or
        non-UTF-8 bytes (the default handler then fails with a 500)."""
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"detail": json_safe(errors)}, status_code=422)

    # Without a key no dependency at all: FastAPI resolves dependencies on every request (a fifth of the event
    # loop's py-spy samples for one-text requests; ~5 % less server CPU per request without it), and on a 2-core
    # CPU the loop's time is taken from the forward.
    scoring = [Depends(_api_key_dependency(settings.api_key))] if settings.api_key is not None else []
    s = settings

    @app.post("/score", response_model=ScoreResponse, responses=SCORING_ERRORS, dependencies=scoring, tags=["scoring"])
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """Score items: `{"text"}`, `{"prompt", "response"}` (concatenated, as in TRL) or `{"messages"}`."""
        started = time.monotonic()
        with runtime.lifecycle.admit():
            check_limits(
                "items",
                len(body.items),
                ((i, path, text) for i, item in enumerate(body.items) for path, text in item.texts()),
                max_items=s.max_items_per_request,
                max_chars=s.max_text_chars,
            )
            info = runtime.info
            if body.normalize and not info.normalization:
                raise InvalidInput(["body", "normalize"], "this model has no normalization statistics in its manifest")
            scored = await runtime.scorer.score(
                [item.as_item() for item in body.items],
                locs=[["body", "items", i] for i in range(len(body.items))],
                started=started,
                wait_for_disconnect=_disconnect_of(request),
            )
            scores = scored.scores
            if body.normalize:
                scores = [normalize(x, info.normalization) for x in scores]
            return ScoreResponse(
                scores=scores,
                truncated=scored.truncated,
                model=info.name,
                model_version=info.version,
                normalized=body.normalize,
            )

    @app.post(
        "/compare", response_model=CompareResponse, responses=SCORING_ERRORS, dependencies=scoring, tags=["scoring"]
    )
    async def compare(body: CompareRequest, request: Request) -> CompareResponse:
        """Preference margins r(chosen) - r(rejected) and sigmoid(margin), for evaluation and best-of-n."""
        started = time.monotonic()
        with runtime.lifecycle.admit():
            check_limits(
                "pairs",
                len(body.pairs),
                ((i, path, text) for i, pair in enumerate(body.pairs) for path, text in pair.texts()),
                max_items=s.max_items_per_request,
                max_chars=s.max_text_chars,
            )
            items, locs = [], []
            for i, pair in enumerate(body.pairs):
                row = pair.as_row()
                try:
                    items += [pair_side(row, "chosen"), pair_side(row, "rejected")]
                except FormattingError as exc:
                    raise InvalidInput(["body", "pairs", i], str(exc)) from exc
                locs += [["body", "pairs", i, "chosen"], ["body", "pairs", i, "rejected"]]
            scored = await runtime.scorer.score(
                items, locs=locs, started=started, wait_for_disconnect=_disconnect_of(request)
            )
            chosen, rejected = scored.scores[0::2], scored.scores[1::2]
            margins = [c - r for c, r in zip(chosen, rejected)]
            info = runtime.info
            return CompareResponse(
                margins=margins,
                probabilities=[_sigmoid(m) for m in margins],
                chosen_scores=chosen,
                rejected_scores=rejected,
                model=info.name,
                model_version=info.version,
            )

    @app.post(
        "/get_reward",
        response_model=GetRewardResponse,
        responses=SCORING_ERRORS,
        dependencies=scoring,
        tags=["scoring"],
    )
    async def get_reward(body: GetRewardRequest, request: Request) -> GetRewardResponse:
        """OpenRLHF's remote reward protocol: `--remote_rm_url http://HOST:PORT/get_reward`."""
        started = time.monotonic()
        with runtime.lifecycle.admit():
            check_limits(
                "query",
                len(body.query),
                ((i, "", text) for i, text in enumerate(body.query)),
                max_items=s.max_items_per_request,
                max_chars=s.max_text_chars,
            )
            scored = await runtime.scorer.score(
                [{"text": q} for q in body.query],
                locs=[["body", "query", i] for i in range(len(body.query))],
                started=started,
                wait_for_disconnect=_disconnect_of(request),
            )
            return GetRewardResponse(rewards=scored.scores, scores=scored.scores, extra_logs={})

    @app.get("/healthz", responses={503: {"description": "loading the model failed"}}, tags=["probes"])
    async def healthz() -> JSONResponse:
        """The process is alive (never waits on the model)."""
        phase = runtime.lifecycle.phase
        return JSONResponse(
            {"status": "failed" if phase is Phase.FAILED else "alive", "phase": phase.value},
            status_code=503 if phase is Phase.FAILED else 200,
        )

    @app.get("/readyz", responses={503: {"description": "loading, failed or shutting down"}}, tags=["probes"])
    async def readyz() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before, and from the moment shutdown begins."""
        lifecycle = runtime.lifecycle
        body: dict[str, Any] = {"status": "ready" if lifecycle.ready else "not ready", "phase": lifecycle.phase.value}
        if lifecycle.failure:
            body["failure"] = lifecycle.failure
        return JSONResponse(body, status_code=200 if lifecycle.ready else 503)

    @app.get("/info", response_model=InfoResponse, tags=["probes"])
    async def info() -> InfoResponse:
        """Model, version, dtype, device, formatting recipe, normalization, batching limits."""
        model = runtime.info
        limits = runtime.limits
        return InfoResponse(
            model=model.name,
            model_version=model.version,
            source=model.source,
            dtype=model.dtype,
            device=model.device,
            has_manifest=model.has_manifest,
            base_model=model.base_model,
            reward_label=model.reward_label,
            formatting=model.formatting,
            normalization=model.normalization,
            batching={
                "max_batch_tokens": limits.max_batch_tokens,
                "max_batch_size": limits.max_batch_size,
                "max_wait_ms": limits.max_wait_s * 1000,
                "max_queue_tokens": limits.max_queue_tokens,
                "inference_workers": runtime.threads.workers if runtime.threads else None,
                "torch_threads_per_worker": runtime.threads.threads_per_worker if runtime.threads else None,
            },
            limits={
                "max_items_per_request": s.max_items_per_request,
                "max_body_bytes": s.max_body_bytes,
                "max_text_chars": s.max_text_chars,
                "request_timeout_s": s.request_timeout_s,
                "api_key_required": s.api_key is not None,
            },
            ready=runtime.lifecycle.ready,
        )

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text format."""
        content, media_type = runtime.metrics.render()
        return Response(content, media_type=media_type)

    return app


def _api_key_dependency(api_key: SecretStr):
    bearer = HTTPBearer(auto_error=False, description="the service's API key")
    expected = api_key.get_secret_value().encode()

    async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise Unauthorized()

    return require_api_key


def _disconnect_of(request: Request):
    """A coroutine function that returns once the client has gone away."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait_for_disconnect


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
