"""One job seen from the Cloud: reservation, following events, cancelling on the way out.

``JobRun`` owns a submitted job until it ends: it turns transport failures into
``ErrorEvent``s, records metrics, and ``abort()`` cancels the job on the Network unless it
already finished, which every response path calls in a ``finally``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs

from resultity_core import (
    ChatCompletionRequest,
    CompletionRequest,
    InternalServerError,
    OpenAIRequestError,
    invalid_request,
    no_capacity,
    request_to_dict,
)
from resultity_servers._http import HTTPClientError, HTTPConnectError

from ._metrics import CloudMetrics
from ._network import (
    DoneEvent,
    ErrorEvent,
    JobEvent,
    JobHandle,
    ModelInfo,
    NetworkClient,
    TokenEvent,
)

__all__ = ["Estimate", "JobRun", "job_request", "prompt_bytes", "reservation"]

# Tokens a chat template may add per message and per request (role markers, BOS, the
# assistant header): generous, since an underestimate would let a job overspend.
_PER_MESSAGE = 8
_PER_REQUEST = 16
_CANCEL_TIMEOUT_S = 2.0


def _decimal(value: object) -> object:
    return repr(value) if isinstance(value, float) else value


def job_request(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """Return the request as the Network and nodes take it: its JSON form with every
    fractional setting as a decimal string (``"temperature": "0.7"``), since jobs travel as
    canonical JSON, which has no floats."""
    out = request_to_dict(request)
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = repr(value)
        elif key == "logit_bias" and isinstance(value, dict):
            out[key] = {k: _decimal(v) for k, v in value.items()}
    return out


def prompt_bytes(request: ChatCompletionRequest | CompletionRequest) -> list[int]:
    """Return the UTF-8 size of each prompt (one entry per chat request)."""
    if isinstance(request, ChatCompletionRequest):
        size = sum(len(m.text.encode()) + _PER_MESSAGE for m in request.messages)
        return [size]
    return [len(p.encode()) for p in request.prompt]


@attrs.frozen
class Estimate:
    """The worst case of a request: prompt tokens, completion tokens (all choices), cost."""

    prompt_tokens: int
    completion_tokens: int
    cost: int


def reservation(request: ChatCompletionRequest | CompletionRequest, model: ModelInfo) -> Estimate:
    """Return the request's worst case at ``model``'s price (cost in micro-credits).

    A prompt never has more tokens than UTF-8 bytes plus template overhead (byte-fallback
    tokenizers), and no sequence exceeds the model's context. Raises ``InvalidRequestError``
    when ``max_tokens`` cannot fit in the context.
    """
    ctx = model.max_model_len
    max_tokens = request.effective_max_tokens
    param = "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        param = "max_completion_tokens"
    if max_tokens is not None and max_tokens >= ctx:
        raise invalid_request(
            f"'{param}' is {max_tokens}, but the model `{model.id}` has a context of {ctx} "
            "tokens for the prompt and the completion together.",
            param=param,
            code="context_length_exceeded",
        )
    per_choice = max_tokens if max_tokens is not None else ctx - 1
    prompts = [min(size + _PER_REQUEST, ctx) for size in prompt_bytes(request)]
    completion = request.n * len(prompts) * per_choice
    milli = sum(prompts) * model.price.prompt_per_1k + completion * model.price.completion_per_1k
    return Estimate(sum(prompts), completion, -(-milli // 1000))


class JobRun:
    """Follow one submitted job's events; see the module docstring."""

    def __init__(
        self,
        network: NetworkClient,
        handle: JobHandle,
        metrics: CloudMetrics,
        route: str,
        started: float,
    ) -> None:
        self.network = network
        self.handle = handle
        self.metrics = metrics
        self.route = route
        self.started = started
        self._events: AsyncIterator[JobEvent] = aiter(network.events(handle))
        self.finished = False
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.prompt_tokens: int | None = None
        self.usage_completion: int | None = None
        metrics.jobs_in_flight.add(1)

    async def next(self) -> JobEvent | None:
        """Return the next event, or None when the Network ended the job's stream.

        Never raises for Network failures: they come back as ``ErrorEvent``s.
        """
        if self.finished:
            return None
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            await self._end()
            return None
        except OpenAIRequestError as exc:
            event = ErrorEvent(exc)
        except HTTPClientError as exc:
            event = ErrorEvent(no_capacity() if isinstance(exc, HTTPConnectError) else _lost(exc))
        if isinstance(event, TokenEvent):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
                self.metrics.ttft.observe(self.first_token_at - self.started, self.route)
            self.completion_tokens += event.tokens
        elif isinstance(event, DoneEvent):
            # Counts are for the whole job so far; the largest seen is the job's.
            if event.prompt_tokens is not None:
                self.prompt_tokens = max(self.prompt_tokens or 0, event.prompt_tokens)
            if event.completion_tokens is not None:
                self.usage_completion = max(self.usage_completion or 0, event.completion_tokens)
        else:
            await self._end()
        return event

    def usage(self) -> tuple[int, int]:
        """Return ``(prompt, completion)`` tokens: the Network's counts when it sent them."""
        completion = self.usage_completion
        if completion is None:
            completion = self.completion_tokens
        return self.prompt_tokens or 0, completion

    async def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.jobs_in_flight.add(-1)
        prompt, completion = self.usage()
        self.metrics.prompt_tokens.inc(self.handle.model, amount=prompt)
        self.metrics.completion_tokens.inc(self.handle.model, amount=completion)
        closer = getattr(self._events, "aclose", None)
        if closer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_TIMEOUT_S):
                await closer()

    async def finish(self) -> None:
        """Mark the job ended normally (every choice done)."""
        await self._end()

    async def abort(self) -> None:
        """Cancel the job on the Network unless it ended (safe to call from ``finally``)."""
        if self.finished:
            return
        self.metrics.cancelled.inc()
        # If this fails the Network still expires the job once its stream is closed.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_CANCEL_TIMEOUT_S),
            contextlib.suppress(OpenAIRequestError, HTTPClientError),
        ):
            await self.network.cancel(self.handle)
        await self._end()


def _lost(exc: Exception) -> InternalServerError:
    return InternalServerError(f"Lost the connection to the network while streaming: {exc}")
