"""The HTTP app: :func:`create_app` wires the runtime, the middlewares, the error handlers and one router per
protocol (:mod:`service.api`); it holds no route logic.

``create_app(settings)`` loads the checkpoint in a background thread at startup (so /healthz answers and /readyz
says 503 while it loads and warms up); ``create_app(settings, backend)`` serves any object with the
:class:`~service.backend.ScoringBackend` shape instead (tests use this for fault injection).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from service.api import native, openrlhf, probes, slime, vllm
from service.api.common import api_key_dependencies, install_error_handlers
from service.backend import ScoringBackend
from service.middleware import BodySizeLimit, RequestMetrics
from service.runtime import ServiceRuntime
from service.settings import ServeSettings

__all__ = ["ROUTES", "SCORING_ROUTERS", "ServiceRuntime", "create_app"]

# Every scoring protocol; each is behind the API key when the service has one. Probes never are.
SCORING_ROUTERS: tuple[APIRouter, ...] = (native.router, openrlhf.router, slime.router, vllm.router)

# The paths the request metrics label by name (anything else is counted as "other", so label values stay bounded).
ROUTES = frozenset(route.path for router in (*SCORING_ROUTERS, probes.router) for route in router.routes)


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
    install_error_handlers(app, runtime.metrics)

    key = api_key_dependencies(settings.api_key)
    for router in SCORING_ROUTERS:
        app.include_router(router, dependencies=key)
    app.include_router(probes.router)
    return app
