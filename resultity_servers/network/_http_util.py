"""Small pieces the Network's HTTP handlers share: bodies, errors, JSON forms."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import anyio

from resultity_core import InvalidRequestError, parse_json_strict
from resultity_servers._http import Request, Response, StreamingResponse

from ._coordinator import AccountBalance
from ._records import JobRecord

__all__ = [
    "PREFIX",
    "Reply",
    "balance_json",
    "bearer",
    "decimalize",
    "error_response",
    "int_field",
    "job_json",
    "json_object",
    "waiter",
]

Reply = Response | StreamingResponse
PREFIX = "/network/v1"


def error_response(status: int, message: str, code: str | None, kind: str = "network_error",
           param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response.json(body, status=status)


def bearer(request: Request) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _body(request: Request) -> Any:
    """Parse the body strictly (duplicate keys refused); raises MalformedEnvelopeError."""
    return parse_json_strict(request.body or b"{}")


def json_object(request: Request) -> dict[str, Any]:
    body = _body(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return body


def decimalize(value: Any, path: str = "request") -> Any:
    """Return ``value`` with every float replaced by its shortest decimal text.

    Leases are canonical JSON (no floats); nodes read fractional settings back from decimal
    strings. Raises InvalidRequestError for NaN or infinity.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(f"{path} must be a finite number", param=path)
        return repr(value)
    if isinstance(value, dict):
        return {k: decimalize(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [decimalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def int_field(body: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be a non-negative integer", param=name)
    return value



def job_json(job: JobRecord) -> dict[str, Any]:
    return {
        "job_id": job.job_id, "account_id": job.account_id, "model": job.model,
        "state": str(job.state), "node_id": job.node_id, "attempts": job.attempts,
        "reserved": job.reserved, "charge": job.charge, "settled": job.settled,
        "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
        "error": job.error, "created": job.created, "first_token_at": job.first_token_at,
    }


def balance_json(balance: AccountBalance) -> dict[str, Any]:
    return {"account_id": balance.account_id, "balance": balance.balance,
            "reserved": balance.reserved}



def waiter(waiters: dict[str, anyio.Event], name: str) -> anyio.Event:
    """Return the event a task waits on for news about ``name`` (created on first use)."""
    event = waiters.get(name)
    if event is None:
        event = waiters[name] = anyio.Event()
    return event
