"""``HTTPNetworkClient``: the ``NetworkClient`` over the Network's internal Cloud routes.

Every request carries ``Authorization: Bearer <service token>``. Routes (``ROUTES``):

- ``POST /network/v1/auth`` ``{"api_key"}`` -> ``{"account_id", "name"?}``; an unknown key
  is a 401 whose error code is ``invalid_api_key`` (any other 401/403: bad service token)
- ``GET /network/v1/models`` -> ``{"data": [{"id" (or "name"), "price": {"prompt_per_1k",
  "completion_per_1k"}, "max_model_len"?, "created"?, "owned_by"?, "nodes" (or
  "ready_nodes")?}]}``
- ``GET /network/v1/status`` -> ``{"nodes_live", "nodes_ready", "queue_depth"?,
  "jobs_in_flight"?}``
- ``POST /network/v1/jobs`` ``{"account_id", "kind", "model", "request", "reserve",
  "choices", "prompt_tokens_estimate", "max_tokens", "stream": true}`` -> the job's SSE
  events (as below) with its id in the ``x-job-id`` header; errors as OpenAI error bodies
  with their status. ``submit`` sends this and keeps the stream open for ``events``: one
  round trip per job instead of two. A Network that answers JSON ``{"job_id"}`` instead
  (no ``stream`` support) is followed with the GET below.
- ``GET /network/v1/jobs/{job_id}/events`` -> SSE, one core ``JobEvent`` payload per event
- ``POST /network/v1/jobs/{job_id}/cancel``

Failures to reach the Network become ``NoCapacityError`` (503): the user can retry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import AsyncExitStack
from decimal import Decimal, InvalidOperation
from typing import Any

import anyio

from resultity_core import (
    ERROR_KINDS,
    InsufficientQuotaError,
    InternalServerError,
    InvalidRequestError,
    JobUsage,
    ModelNotFoundError,
    NoCapacityError,
    OpenAIRequestError,
    Price,
    RateLimitedError,
    RequestTooLargeError,
    SSEEvent,
    WireMessageError,
    no_capacity,
)
from resultity_core import JobEvent as WireJobEvent
from resultity_servers._http import (
    ClientResponse,
    HTTPClient,
    HTTPClientError,
    StreamingClientResponse,
)

from ._network import (
    Account,
    DoneEvent,
    ErrorEvent,
    JobEvent,
    JobHandle,
    JobSubmission,
    ModelInfo,
    NetworkStatus,
    TokenEvent,
    TokenLogprob,
    network_unavailable,
)

__all__ = ["ROUTES", "HTTPNetworkClient", "error_from_response", "event_from_payload"]

ROUTES: Mapping[str, str] = {
    "auth": "/network/v1/auth",
    "models": "/network/v1/models",
    "status": "/network/v1/status",
    "submit": "/network/v1/jobs",
    "events": "/network/v1/jobs/{job_id}/events",
    "cancel": "/network/v1/jobs/{job_id}/cancel",
}

JOB_ID_HEADER = "x-job-id"
"""The header naming the job of a submit answered with its event stream."""

DEFAULT_CONTEXT = 4096
"""Context length assumed for a model the Network lists without one."""

_BY_STATUS: Mapping[int, type[OpenAIRequestError]] = {
    400: InvalidRequestError,
    402: InsufficientQuotaError,
    404: ModelNotFoundError,
    413: RequestTooLargeError,
    429: RateLimitedError,
    503: NoCapacityError,
}


def _error_detail(body: bytes) -> dict[str, Any]:
    """Return the ``error`` object of an OpenAI error body ({} when there is none)."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def error_from_response(status: int, body: bytes) -> OpenAIRequestError:
    """Return the user-facing error for a Network error response.

    Statuses a user may see (400, 402, 404, 413, 429, 503) keep the Network's message,
    param and code; anything else (401 for a wrong service token, 5xx) is the Cloud's
    problem and becomes a 503.
    """
    cls = _BY_STATUS.get(status)
    if cls is None:
        return network_unavailable(f"network answered HTTP {status}")
    detail = _error_detail(body)
    code = detail.get("code")
    if isinstance(code, str) and code in ERROR_KINDS and ERROR_KINDS[code].status == status:
        cls = ERROR_KINDS[code]
    message = detail.get("message")
    param = detail.get("param")
    return cls(
        message if isinstance(message, str) else None,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
        status=status,
    )


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise WireMessageError("logprobs", "a logprob must be a number or decimal string")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Decimal(value))
        except InvalidOperation:
            pass
    raise WireMessageError("logprobs", f"bad logprob {value!r}")


def _logprob(item: Mapping[str, Any]) -> TokenLogprob:
    token = item.get("token")
    if not isinstance(token, str):
        raise WireMessageError("logprobs.token", "must be a string")
    raw_bytes = item.get("bytes")
    top = item.get("top_logprobs") or []
    return TokenLogprob(
        token=token,
        logprob=_number(item.get("logprob")),
        bytes=tuple(int(b) for b in raw_bytes) if isinstance(raw_bytes, list) else None,
        top=tuple((str(t.get("token", "")), _number(t.get("logprob"))) for t in top),
    )


def event_from_payload(payload: Mapping[str, Any]) -> JobEvent:
    """Return the Cloud event of a core ``JobEvent`` payload.

    Token logprobs are ``{"token", "logprob", "bytes"?, "top_logprobs"?: [{"token",
    "logprob"}]}`` with logprobs as decimal strings (no floats on the wire). Raises
    ``WireMessageError`` for a malformed payload.
    """
    wire = WireJobEvent.from_payload(payload)
    if wire.kind == "token":
        logprobs = tuple(_logprob(x) for x in wire.logprobs) if wire.logprobs else None
        return TokenEvent(wire.index, wire.text, len(wire.token_ids), logprobs)
    if wire.kind == "done":
        usage = wire.usage or JobUsage(0, 0)
        return DoneEvent(
            wire.index,
            wire.finish_reason or "stop",
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    return ErrorEvent(InternalServerError(f"The job failed: {wire.error}"))


def _model_info(m: Mapping[str, Any]) -> ModelInfo:
    price = m["price"]
    context = m.get("max_model_len", m.get("context_length", DEFAULT_CONTEXT))
    return ModelInfo(
        id=str(m.get("id", m.get("name"))),
        price=Price(int(price["prompt_per_1k"]), int(price["completion_per_1k"])),
        max_model_len=int(context),
        created=int(m.get("created", 0)),
        owned_by=str(m.get("owned_by", "resultity")),
        nodes=int(m.get("nodes", m.get("ready_nodes", 0))),
    )


# How long closing a finished job's event stream waits for its end (see ``_drain``).
_DRAIN_S = 0.5

# Network failure codes that mean "no node could take the job": the user may retry (503).
_RETRYABLE_CODES = frozenset({"no_capacity", "timeout"})


def _stream_error(detail: object) -> OpenAIRequestError:
    if isinstance(detail, dict):
        message = detail.get("message")
        code = detail.get("code") if isinstance(detail.get("code"), str) else None
        if code in _RETRYABLE_CODES:
            text = message if isinstance(message, str) else no_capacity().message
            return NoCapacityError(text, code=code)
        return InternalServerError(
            f"The job failed: {message}" if isinstance(message, str) else None,
            code=code,
        )
    return InternalServerError(f"The job failed: {detail}")


class HTTPNetworkClient:
    """Talk to the Network at ``base_url`` with the shared ``service_token``."""

    def __init__(self, base_url: str, service_token: str, *, timeout_s: float = 30.0) -> None:
        self.http = HTTPClient(
            base_url,
            headers={"authorization": f"Bearer {service_token}"},
            timeout_s=timeout_s,
        )
        # Event streams opened by ``submit`` and not yet taken by ``events``, by job id.
        self._open: dict[str, tuple[AsyncExitStack, StreamingClientResponse]] = {}

    async def _call(self, method: str, path: str, payload: Any = None) -> ClientResponse:
        try:
            if payload is None:
                return await self.http.request(method, path)
            return await self.http.request(method, path, json=payload)
        except HTTPClientError as exc:
            raise network_unavailable(str(exc)) from exc

    @staticmethod
    def _json(response: ClientResponse) -> Any:
        if not 200 <= response.status < 300:
            raise error_from_response(response.status, response.body)
        try:
            return response.json()
        except ValueError:
            raise network_unavailable("network sent invalid JSON") from None

    async def authenticate(self, api_key: str) -> Account | None:
        """Return the key's account, None for an unknown key."""
        response = await self._call("POST", ROUTES["auth"], {"api_key": api_key})
        if response.status in (401, 403):
            # The same statuses answer a wrong service token: only the error code tells
            # "unknown API key" apart from "this Cloud is not allowed in".
            if _error_detail(response.body).get("code") == "invalid_api_key":
                return None
            raise network_unavailable(f"the network refused this cloud (HTTP {response.status})")
        body = self._json(response)
        if isinstance(body, dict) and body.get("account_id") is None:
            return None
        try:
            return Account(str(body["account_id"]), str(body.get("name") or ""))
        except (KeyError, TypeError):
            raise network_unavailable("network sent a malformed account") from None

    async def list_models(self) -> list[ModelInfo]:
        """Return the Network's models."""
        body = self._json(await self._call("GET", ROUTES["models"]))
        try:
            return [_model_info(m) for m in body["data"]]
        except (KeyError, TypeError, ValueError):
            raise network_unavailable("network sent a malformed model list") from None

    async def status(self) -> NetworkStatus:
        """Return node counts and queue depth."""
        body = self._json(await self._call("GET", ROUTES["status"]))
        try:
            return NetworkStatus(
                int(body["nodes_live"]),
                int(body["nodes_ready"]),
                int(body.get("queue_depth", 0)),
                int(body.get("jobs_in_flight", 0)),
            )
        except (KeyError, TypeError, ValueError):
            raise network_unavailable("network sent a malformed status") from None

    async def submit(self, account: Account, job: JobSubmission) -> JobHandle:
        """Queue the job; raises the Network's 400/402/404/503 as OpenAI errors.

        The Network answers with the job's event stream, kept open for ``events`` (or for
        ``cancel`` / ``aclose`` to close): the caller must follow the handle with one of them.
        """
        payload = {
            "account_id": account.account_id,
            "kind": job.kind,
            "model": job.model,
            "request": job.request,
            "reserve": job.reserve,
            "choices": job.choices,
            "prompt_tokens_estimate": job.prompt_tokens_estimate,
            "max_tokens": job.max_tokens,
            "stream": True,
        }
        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self.http.stream("POST", ROUTES["submit"], json=payload, timeout_s=None))
            job_id = response.header(JOB_ID_HEADER)
            if not 200 <= response.status < 300 or not job_id:
                # A refusal, or a Network without the streamed form: a JSON body.
                body = self._json(ClientResponse(response.status, response.headers,
                                                 await response.aread(), response.url))
                job_id = body.get("job_id") if isinstance(body, dict) else None
                await _close(stack)
                if not isinstance(job_id, str) or not job_id:
                    raise network_unavailable("network sent no job id")
                return JobHandle(job_id, job.model)
        except HTTPClientError as exc:
            await _close(stack)
            raise network_unavailable(str(exc)) from exc
        except BaseException:
            await _close(stack)
            raise
        self._open[job_id] = (stack, response)
        return JobHandle(job_id, job.model)

    def events(self, job: JobHandle) -> AsyncIterator[JobEvent]:
        """Return the job's events from the Network's SSE stream: the one ``submit`` opened,
        else a new ``GET``. Closing the iterator closes the stream (also before the first
        event is read)."""
        opened = self._open.pop(job.job_id, None)
        return _Events(self._follow(job, opened), None if opened is None else opened[0])

    async def _follow(
        self, job: JobHandle, opened: tuple[AsyncExitStack, StreamingClientResponse] | None
    ) -> AsyncGenerator[JobEvent, None]:
        try:
            async with AsyncExitStack() as stack:
                if opened is not None:
                    response = opened[1]
                    await stack.enter_async_context(opened[0])
                else:
                    path = ROUTES["events"].format(job_id=job.job_id)
                    response = await stack.enter_async_context(
                        self.http.stream("GET", path, timeout_s=None))
                if response.status != 200:
                    await response.aread()
                    raise network_unavailable(
                        f"network answered HTTP {response.status} for the events"
                    )
                sses = response.aiter_sse()
                last: JobEvent | None = None
                try:
                    async for sse in sses:
                        if sse.data == "[DONE]":
                            await _drain(sses)
                            return
                        last = self._event(sse)
                        yield last
                        if isinstance(last, ErrorEvent):
                            return
                except GeneratorExit:
                    # Closed after a done event (the Cloud stops at the last choice's):
                    # the Network ends the stream right after it, so read that end and the
                    # connection goes back to the pool instead of being dropped (a new
                    # connection costs a TCP handshake on the next job's path).
                    if isinstance(last, DoneEvent):
                        await _drain(sses)
                    raise
        except HTTPClientError as exc:
            raise network_unavailable(str(exc)) from exc

    @staticmethod
    def _event(sse: SSEEvent) -> JobEvent:
        """Return the Cloud event of one SSE event of a job's stream."""
        try:
            payload = sse.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise network_unavailable("network sent a malformed event")
        if sse.event == "error" or ("error" in payload and "_type" not in payload):
            return ErrorEvent(_stream_error(payload.get("error")))
        try:
            return event_from_payload(payload)
        except WireMessageError as exc:
            raise network_unavailable(f"network sent a bad event: {exc}") from None

    async def cancel(self, job: JobHandle) -> None:
        """Ask the Network to abort the job (a 404 for a finished job is fine)."""
        opened = self._open.pop(job.job_id, None)
        if opened is not None:
            await _close(opened[0])  # the Network cancels a job whose stream closes
        path = ROUTES["cancel"].format(job_id=job.job_id)
        response = await self._call("POST", path, {})
        if response.status >= 500:
            raise error_from_response(response.status, response.body)

    async def aclose(self) -> None:
        """Close pooled connections (and the streams of jobs nobody followed)."""
        opened, self._open = self._open, {}
        for stack, _ in opened.values():
            await _close(stack)
        await self.http.aclose()


async def _drain(sses: AsyncIterator[SSEEvent]) -> None:
    """Read a finished job's stream to its end (``[DONE]``, then the end of the body), for
    at most ``_DRAIN_S``; stop at anything else (the caller then closes the connection)."""
    with anyio.move_on_after(_DRAIN_S), contextlib.suppress(HTTPClientError):
        async for sse in sses:
            if sse.data != "[DONE]":
                return


async def _close(stack: AsyncExitStack) -> None:
    with anyio.CancelScope(shield=True):
        await stack.aclose()


class _Events:
    """A job's events; ``aclose`` also closes a stream the generator never started on."""

    def __init__(self, events: AsyncGenerator[JobEvent, None],
                 opened: AsyncExitStack | None) -> None:
        self._events = events
        self._opened = opened

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> JobEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            if self._opened is not None:
                await _close(self._opened)  # a no-op once the generator has closed it
