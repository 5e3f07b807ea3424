"""What every router shares: the runtime accessor, the documented refusals, the API key check, the error handlers."""

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.requests import HTTPConnection

from service.errors import ServiceError, Unauthorized, json_safe
from service.metrics import ServiceMetrics
from service.runtime import ServiceRuntime
from service.scoring import ScoringService


def runtime_of(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


def scoring_of(request: Request) -> ScoringService:
    return request.app.state.runtime.scoring


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


class _KeyInUrl(HTTPBasic):
    """HTTP Basic credentials whose password is the API key (the user name is ignored).

    That is what an HTTP client sends for a URL with credentials in it (``http://rm:KEY@host:8000/get_reward``):
    requests, aiohttp and httpx all do. OpenRLHF's and slime's reward clients take only a URL, so this is how
    they can carry the key. Malformed Basic credentials count as none (the request then gets the usual 401).
    """

    async def __call__(self, request: HTTPConnection) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return await super().__call__(request)
        except HTTPException:
            return None


def api_key_dependencies(api_key: SecretStr | None) -> list[Any]:
    """The dependencies for the scoring routers: an API key check when the service has a key, else none at all.

    The key is accepted as ``Authorization: Bearer <key>`` or as the password of HTTP Basic credentials (a key in
    the URL). Without a key there is no dependency, not a no-op one: FastAPI resolves dependencies on every
    request, and on a small CPU the event loop's time is taken from the forward passes.
    """
    if api_key is None:
        return []
    bearer = HTTPBearer(auto_error=False, description="the service's API key")
    basic = _KeyInUrl(auto_error=False, description="the service's API key as the password (a key in the URL)")
    expected = api_key.get_secret_value().encode()

    # evaluated here, not postponed: the annotations name this closure's schemes
    async def require_api_key(
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        in_url: Annotated[HTTPBasicCredentials | None, Depends(basic)],
    ) -> None:
        if token is not None:
            given = token.credentials
        elif in_url is not None:
            given = in_url.password
        else:
            given = ""
        if not hmac.compare_digest(given.encode(), expected):
            raise Unauthorized()

    return [Depends(require_api_key)]


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Every refusal, whatever the protocol, is rendered here as ``{"detail": ...}`` with its status and headers."""

    async def service_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        if exc.status_code >= 429 or exc.status_code == 413:
            metrics.rejected.labels(reason=exc.kind).inc()
        return JSONResponse({"detail": json_safe(exc.detail())}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        """FastAPI's 422, but rendered safely: its errors echo the input, which may hold NaN, lone surrogates or
        non-UTF-8 bytes (the default handler then fails with a 500)."""
        assert isinstance(exc, RequestValidationError)
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        return JSONResponse({"detail": json_safe(errors)}, status_code=422)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
