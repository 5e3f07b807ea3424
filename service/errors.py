"""The ways a request can be refused or fail, as types that know their HTTP status.

Routes raise these; one exception handler turns them into JSON ``{"detail": ...}`` responses. Client mistakes are
4xx, never 5xx.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ServiceError(Exception):
    status_code = 500
    kind = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def detail(self) -> Any:
        return self.message


class InvalidInput(ServiceError):
    """A request that parsed but cannot be scored; ``loc`` names the field, as FastAPI's own 422s do."""

    status_code = 422
    kind = "invalid_input"

    def __init__(self, loc: Sequence[str | int], message: str, *, kind: str = "value_error"):
        super().__init__(message)
        self.loc = list(loc)
        self.error_type = kind

    def detail(self) -> Any:
        return [{"loc": self.loc, "msg": self.message, "type": self.error_type}]


class Unauthorized(ServiceError):
    status_code = 401
    kind = "unauthorized"

    def __init__(
        self,
        message: str = "a valid API key is required: an 'Authorization: Bearer <api key>' header, "
        "or the key as the password in the URL (http://user:<api key>@host/...)",
    ):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(ServiceError):
    """A request named a model this service does not serve (OpenAI-style APIs carry a ``model`` field)."""

    status_code = 404
    kind = "model_not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    kind = "payload_too_large"


class Overloaded(ServiceError):
    status_code = 429
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, headers={"Retry-After": str(int(retry_after_s))})
        self.retry_after_s = retry_after_s


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready (nginx's 499); nobody reads this response."""

    status_code = 499
    kind = "client_closed_request"


class ScoringFailed(ServiceError):
    status_code = 500
    kind = "scoring_failed"


class Unavailable(ServiceError):
    """Not ready yet (loading, warming up) or shutting down."""

    status_code = 503
    kind = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(int(retry_after_s))})


class TimedOut(ServiceError):
    status_code = 504
    kind = "timeout"


def json_safe(value: Any) -> Any:
    """``value`` made renderable as strict UTF-8 JSON, for error bodies that echo what the client sent.

    A client can send what Python's JSON parser accepts but no JSON response may hold: NaN and +-Infinity (also
    from ``1e999``), lone surrogates (``"\\ud800"``), and, under a non-JSON content type, raw bytes that are not
    UTF-8. Non-finite numbers become their names as strings, lone surrogates U+FFFD, undecodable bytes U+FFFD.
    """
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
