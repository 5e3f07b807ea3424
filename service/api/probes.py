"""Probes and introspection: ``/healthz``, ``/readyz``, ``/health`` (vLLM's probe), ``/info``, ``/metrics``. Never
behind the API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api.common import runtime_of
from service.combined import Component
from service.engine import Engine
from service.hardware import describe_cpu
from service.lifecycle import Phase
from service.schemas import InfoResponse

router = APIRouter(tags=["probes"])


@router.get("/healthz", responses={503: {"description": "loading the model failed"}})
async def healthz(request: Request) -> JSONResponse:
    """The process is alive (never waits on the model)."""
    phase = runtime_of(request).lifecycle.phase
    return JSONResponse(
        {"status": "failed" if phase is Phase.FAILED else "alive", "phase": phase.value},
        status_code=503 if phase is Phase.FAILED else 200,
    )


@router.get("/readyz", responses={503: {"description": "loading, failed or shutting down"}})
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before, and from the moment shutdown begins."""
    lifecycle = runtime_of(request).lifecycle
    body: dict[str, Any] = {"status": "ready" if lifecycle.ready else "not ready", "phase": lifecycle.phase.value}
    if lifecycle.failure:
        body["failure"] = lifecycle.failure
    return JSONResponse(body, status_code=200 if lifecycle.ready else 503)


@router.get(
    "/health",
    response_class=Response,
    responses={200: {"description": "ready (empty body)"}, 503: {"description": "not ready (empty body)"}},
)
async def health(request: Request) -> Response:
    """vLLM's probe: 200 with an empty body once ready, 503 with an empty body otherwise (vLLM answers 503 when its
    engine is dead, and nothing at all while loading; here loading, a failed load and draining are all 503)."""
    return Response(status_code=200 if runtime_of(request).lifecycle.ready else 503)


@router.get("/info", response_model=InfoResponse)
async def info(request: Request) -> InfoResponse:
    """Model, version, dtype, device, formatting recipe, normalization, batching limits; with several reward models
    served combined, each of them (`components`) and how they are combined (`combine`)."""
    runtime = runtime_of(request)
    s = runtime.settings
    served = runtime.served
    model, engine = served.model, served.engines[0]
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
        batching=_batching(engine),
        limits={
            "max_items_per_request": s.max_items_per_request,
            "max_body_bytes": s.max_body_bytes,
            "max_text_chars": s.max_text_chars,
            "request_timeout_s": s.request_timeout_s,
            "api_key_required": s.api_key is not None,
        },
        ready=runtime.lifecycle.ready,
        cpu=describe_cpu(),
        components=[_component(c) for c in served.components] if served.several else None,
        combine=served.combination.describe() if served.combination is not None else None,
    )


def _component(component: Component) -> dict[str, Any]:
    model = component.engine.info
    return {
        "name": component.name,
        "model": model.name,
        "version": model.version,
        "source": model.source,
        "dtype": model.dtype,
        "device": model.device,
        "has_manifest": model.has_manifest,
        "base_model": model.base_model,
        "reward_label": model.reward_label,
        "formatting": model.formatting,
        "normalization": model.normalization,
        "backend": model.extra.get("backend"),
        "batching": _batching(component.engine),
    }


def _batching(engine: Engine) -> dict[str, Any]:
    model, limits, threads = engine.info, engine.limits, engine.threads
    return {
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_size": limits.max_batch_size,
        "max_wait_ms": limits.max_wait_s * 1000,
        "max_queue_tokens": limits.max_queue_tokens,
        "window_items": limits.window_items,
        "forward": model.extra.get("backend"),
        "graph": model.extra.get("onnx_graph"),
        "fast_graph_missing": model.extra.get("fast_graph_missing"),
        "prefix_sharing": model.extra.get("prefix_sharing", "off"),
        "prefix_cache": model.extra.get("prefix_cache", "off"),
        "inference_workers": threads.workers,
        "torch_threads_per_worker": threads.threads_per_worker,
    }


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    content, media_type = runtime_of(request).metrics.render()
    return Response(content, media_type=media_type)
