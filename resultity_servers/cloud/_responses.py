"""Turning a job's events into OpenAI responses: one JSON object, or an SSE stream.

A ``Shape`` adapts the core's response builders to the two endpoints (chat, completions);
``full_response`` and ``stream_response`` drive a ``JobRun`` through it. Before anything is
sent, a job failure becomes an HTTP error status; after the stream started, it becomes an SSE
``error`` event and the stream ends (no ``[DONE]``).
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, TypeVar

from resultity_core import (
    DONE,
    ChatCompletionRequest,
    ChatResponseBuilder,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponseBuilder,
    InternalServerError,
    OpenAIRequestError,
    TopLogprob,
    Usage,
    encode_event,
    error_event,
)
from resultity_servers._http import Response, StreamingResponse

from ._jobs import JobRun
from ._network import DoneEvent, ErrorEvent, JobEvent, TokenEvent, TokenLogprob

__all__ = [
    "ChatShape",
    "ClosingStream",
    "CompletionShape",
    "Shape",
    "error_response",
    "full_response",
    "stream_response",
]


class Shape(Protocol):
    """What the response drivers need from an endpoint; ``choices`` is how many it answers.

    Every method returns JSON-ready dicts; the core builders raise ``InternalServerError``
    for a choice index out of range or text after a choice finished.
    """

    choices: int

    def start(self) -> list[dict[str, Any]]:
        """Return the chunks that open a stream (chat: the ``role`` chunk; completions: none)."""
        ...

    def token(self, event: TokenEvent) -> dict[str, Any]:
        """Return the stream chunk of new text (and logprobs) for ``event.index``."""
        ...

    def finish(self, event: DoneEvent) -> dict[str, Any]:
        """Return the chunk ending choice ``event.index`` with its ``finish_reason``."""
        ...

    def finished(self) -> int:
        """Return how many choices have finished."""
        ...

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """Return the final usage-only chunk of a stream with ``include_usage``."""
        ...

    def final(self, usage: Usage) -> dict[str, Any]:
        """Return the non-streamed response object; raises before every choice finished."""
        ...


def _chat_logprobs(items: tuple[TokenLogprob, ...] | None) -> tuple[ChatTokenLogprob, ...]:
    return tuple(
        ChatTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=lp.bytes if lp.bytes is not None else tuple(lp.token.encode()),
            top_logprobs=tuple(
                TopLogprob(token=t, logprob=v, bytes=tuple(t.encode())) for t, v in lp.top
            ),
        )
        for lp in items or ()
    )


_Builder = TypeVar("_Builder", ChatResponseBuilder, CompletionResponseBuilder)


def _finish_reason(event: DoneEvent) -> Literal["stop", "length"]:
    # a reason OpenAI does not define for these endpoints is reported as "stop"
    return "length" if event.finish_reason == "length" else "stop"


class _BuilderShape(Generic[_Builder]):
    """What both shapes do alike: forward to the core builder, count finished choices."""

    builder: _Builder

    def __init__(self, builder: _Builder, choices: int, logprobs: bool) -> None:
        self.builder = builder
        self.choices = choices
        self.logprobs = logprobs
        self._done = 0

    def finish(self, event: DoneEvent) -> dict[str, Any]:
        chunk = self.builder.finish(event.index, _finish_reason(event))
        self._done += 1
        return chunk.to_dict()

    def finished(self) -> int:
        return self._done

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self.builder.usage_chunk(usage).to_dict()

    def final(self, usage: Usage) -> dict[str, Any]:
        return self.builder.completion(usage, logprobs=self.logprobs).to_dict()


class ChatShape(_BuilderShape[ChatResponseBuilder]):
    """``chat.completion`` objects and ``chat.completion.chunk`` stream chunks."""

    def __init__(self, request: ChatCompletionRequest, created: int | None = None) -> None:
        builder = ChatResponseBuilder(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()) if created is None else created,
            model=request.model,
            n=request.n,
        )
        super().__init__(builder, request.n, request.logprobs)

    def start(self) -> list[dict[str, Any]]:
        return [self.builder.start().to_dict()]

    def token(self, event: TokenEvent) -> dict[str, Any]:
        lps = _chat_logprobs(event.logprobs) if self.logprobs else ()
        return self.builder.add(event.index, event.text, lps).to_dict()


class CompletionShape(_BuilderShape[CompletionResponseBuilder]):
    """``text_completion`` objects and stream chunks; choice ``i`` answers prompt ``i // n``.

    ``text_offset`` counts characters from the start of the choice's prompt, as OpenAI does.
    """

    def __init__(self, request: CompletionRequest, created: int | None = None) -> None:
        choices = request.n * len(request.prompt)
        builder = CompletionResponseBuilder(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()) if created is None else created,
            model=request.model,
            n=choices,
        )
        super().__init__(builder, choices, request.logprobs is not None)
        self._offsets = [len(request.prompt[i // request.n]) for i in range(choices)]

    def start(self) -> list[dict[str, Any]]:
        return []

    def token(self, event: TokenEvent) -> dict[str, Any]:
        lps = None
        if self.logprobs and event.logprobs and 0 <= event.index < self.choices:
            offsets = []
            for lp in event.logprobs:
                offsets.append(self._offsets[event.index])
                self._offsets[event.index] += len(lp.token)
            lps = CompletionLogprobs(
                tokens=tuple(lp.token for lp in event.logprobs),
                token_logprobs=tuple(lp.logprob for lp in event.logprobs),
                top_logprobs=tuple(dict(lp.top) for lp in event.logprobs),
                text_offset=tuple(offsets),
            )
        return self.builder.add(event.index, event.text, lps).to_dict()


def _ended_early(shape: Shape) -> InternalServerError:
    return InternalServerError(
        f"The network ended the job after {shape.finished()} of {shape.choices} choices."
    )


def error_response(error: OpenAIRequestError) -> Response:
    """Return the JSON error response of ``error``: its status and OpenAI error body."""
    return Response.json(error.to_error_body(), status=error.status)


def _apply(shape: Shape, event: JobEvent) -> dict[str, Any] | None:
    """Return the chunk for a token or done event (None for a token event that carries
    nothing to show); raises ``OpenAIRequestError``."""
    if isinstance(event, TokenEvent):
        if not event.text and not event.logprobs:
            return None
        return shape.token(event)
    if isinstance(event, DoneEvent):
        return shape.finish(event)
    raise event.error


async def full_response(run: JobRun, shape: Shape) -> Response:
    """Return the non-streamed response, or the error status of a failed job.

    The job is cancelled if this is left early (client gone, server stopping).
    """
    try:
        while (event := await run.next()) is not None:
            _apply(shape, event)
            if shape.finished() == shape.choices:
                break
        if shape.finished() < shape.choices:
            raise _ended_early(shape)
        await run.finish()
        return Response.json(shape.final(Usage.of(*run.usage())))
    except OpenAIRequestError as exc:
        return error_response(exc)
    finally:
        await run.abort()


async def stream_response(
    run: JobRun, shape: Shape, include_usage: bool
) -> Response | StreamingResponse:
    """Return the SSE response once the job's first event arrived.

    A job that fails before its first event gets an error status instead; the job is
    cancelled whenever the response ends before the job did (client gone included).
    """
    handed_over = False
    try:
        first = await run.next()
        if isinstance(first, ErrorEvent):
            return error_response(first.error)
        if first is None:
            return error_response(_ended_early(shape))
        handed_over = True
        return StreamingResponse.sse(
            ClosingStream(_events(run, shape, first, include_usage), run.abort)
        )
    finally:
        if not handed_over:
            await run.abort()


async def _events(
    run: JobRun, shape: Shape, first: JobEvent, include_usage: bool
) -> AsyncIterator[bytes]:
    try:
        out = [encode_event(chunk) for chunk in shape.start()]
        event: JobEvent | None = first
        while event is not None:
            try:
                chunk = _apply(shape, event)
                if chunk is not None:
                    out.append(encode_event(chunk))
            except OpenAIRequestError as exc:
                yield b"".join(out) + error_event(exc)
                return
            if shape.finished() == shape.choices:
                break
            yield b"".join(out)
            out = []
            event = await run.next()
        if shape.finished() < shape.choices:
            yield b"".join(out) + error_event(_ended_early(shape))
            return
        await run.finish()
        if include_usage:
            out.append(encode_event(shape.usage_chunk(Usage.of(*run.usage()))))
        yield b"".join(out) + DONE
    finally:
        await run.abort()


class ClosingStream(AsyncGenerator[bytes, None]):
    """An async generator over ``chunks`` whose ``aclose`` always runs ``cleanup``.

    A plain generator closed before its first step never runs its ``finally``; the server
    may close a stream whose head could not even be sent, and the job must still be
    cancelled. ``cleanup`` runs once (sync or async), when the chunks end or on ``aclose``.
    """

    def __init__(
        self, chunks: AsyncIterable[bytes], cleanup: Callable[[], Awaitable[None] | None]
    ) -> None:
        self._chunks = aiter(chunks)
        self._cleanup: Callable[[], Awaitable[None] | None] | None = cleanup

    async def _run_cleanup(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            result = cleanup()
            if inspect.isawaitable(result):
                await result

    async def asend(self, value: None) -> bytes:
        try:
            return await anext(self._chunks)
        except BaseException:
            await self._run_cleanup()
            raise

    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> bytes:
        await self.aclose()
        if isinstance(typ, BaseException):
            raise typ
        raise typ()

    async def aclose(self) -> None:
        try:
            closer = getattr(self._chunks, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            await self._run_cleanup()
