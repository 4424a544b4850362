"""OpenAI error bodies and HTTP statuses: one table, constructors, the stream error event.

Servers raise the ``OpenAIRequestError`` subclasses (or build them here) and answer with
``error.status`` and ``error.to_error_body()``; after a stream has started they send
``error_event(error)`` instead, which the official ``openai`` client raises as ``APIError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ._errors import (
    InsufficientQuotaError,
    InternalServerError,
    InvalidAPIKeyError,
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    OpenAIRequestError,
    RateLimitedError,
    RequestTooLargeError,
)
from ._sse import encode_event

__all__ = [
    "ERROR_KINDS",
    "ERROR_STATUS",
    "error_body",
    "error_event",
    "insufficient_quota",
    "invalid_api_key",
    "invalid_request",
    "model_not_found",
    "no_capacity",
    "request_too_large",
]

ERROR_KINDS: Mapping[str, type[OpenAIRequestError]] = MappingProxyType(
    {
        "invalid_request": InvalidRequestError,
        "invalid_api_key": InvalidAPIKeyError,
        "insufficient_quota": InsufficientQuotaError,
        "model_not_found": ModelNotFoundError,
        "request_too_large": RequestTooLargeError,
        "rate_limit_exceeded": RateLimitedError,
        "server_error": InternalServerError,
        "no_capacity": NoCapacityError,
    }
)
"""Error kind -> exception class; each class carries its HTTP ``status`` and error ``type``."""

ERROR_STATUS: Mapping[str, int] = MappingProxyType(
    {kind: cls.status for kind, cls in ERROR_KINDS.items()}
)
"""Error kind -> HTTP status (400, 401, 402, 404, 413, 429, 500, 503)."""


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, dict[str, str | None]]:
    """Return ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(
    message: str, param: str | None = None, code: str | None = None
) -> InvalidRequestError:
    """Return a 400 error naming ``param``."""
    return InvalidRequestError(message, param=param, code=code)


def invalid_api_key() -> InvalidAPIKeyError:
    """Return the 401 for a missing or unknown API key (the key itself is never echoed)."""
    return InvalidAPIKeyError(
        "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a valid key."
    )


def insufficient_quota(
    needed: int | None = None, available: int | None = None, *, status: int = 402
) -> InsufficientQuotaError:
    """Return the out-of-credits error (``status`` 402, or 429 as OpenAI itself answers).

    ``needed``/``available`` are micro-credits, quoted in the message when given.
    """
    message = InsufficientQuotaError.default_message
    if needed is not None and available is not None:
        message = (
            "You exceeded your current quota: the request may cost up to "
            f"{needed} micro-credits and the account has {available}."
        )
    return InsufficientQuotaError(message, status=status)


def model_not_found(model: str) -> ModelNotFoundError:
    """Return the 404 for an unknown model, worded as OpenAI words it."""
    return ModelNotFoundError(
        f"The model `{model}` does not exist or you do not have access to it.", param="model"
    )


def no_capacity(model: str | None = None) -> NoCapacityError:
    """Return the 503 for "no live node can serve this model now"."""
    what = f"the model `{model}`" if model else "this request"
    return NoCapacityError(f"No node can serve {what} right now; retry later.")


def request_too_large(limit_bytes: int) -> RequestTooLargeError:
    """Return the 413 for a body over ``limit_bytes``."""
    return RequestTooLargeError(f"The request body exceeds the limit of {limit_bytes} bytes.")


def error_event(error: OpenAIRequestError) -> bytes:
    """Return the SSE ``error`` event that ends a stream which failed after it started."""
    return encode_event(error.to_error_body(), event="error")
