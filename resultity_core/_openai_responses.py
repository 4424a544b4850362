"""OpenAI response types: chat completions, completions, their stream chunks, model lists.

Field names and nesting follow the official API byte for byte; ``to_dict()`` gives the JSON
form. Keys are left out only where OpenAI leaves them out (empty fields of a stream ``delta``);
everywhere else an unset optional field is ``null``. ``id`` and ``created`` are passed in.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import cattrs
from attrs import field, frozen
from cattrs.gen import make_dict_unstructure_fn

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatLogprobs",
    "ChatMessageOut",
    "ChatTokenLogprob",
    "ChunkDelta",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionFinishReason",
    "CompletionLogprobs",
    "FinishReason",
    "ModelCard",
    "ModelList",
    "TopLogprob",
    "Usage",
]

FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call"]
CompletionFinishReason = Literal["stop", "length", "content_filter"]

# OpenAI's stand-in for "very unlikely": JSON has no -Infinity.
_MIN_LOGPROB = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None else _finite(value)


def _tuple_of_finite_or_none(values: Any) -> tuple[float | None, ...]:
    return tuple(_finite_or_none(v) for v in values)


def _top_maps(values: Any) -> tuple[dict[str, float] | None, ...]:
    return tuple(None if m is None else {k: _finite(v) for k, v in m.items()} for m in values)


@frozen(kw_only=True)
class Usage:
    """Token counts of a whole request (all choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Return the usage with ``total_tokens`` computed."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


@frozen(kw_only=True)
class TopLogprob:
    """One alternative token at a position (chat logprobs)."""

    token: str
    logprob: float = field(converter=_finite)
    bytes: tuple[int, ...] | None = None


@frozen(kw_only=True)
class ChatTokenLogprob:
    """The logprob of one generated token and its top alternatives (chat logprobs)."""

    token: str
    logprob: float = field(converter=_finite)
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@frozen(kw_only=True)
class ChatLogprobs:
    """``choices[i].logprobs`` of a chat completion or chunk."""

    content: tuple[ChatTokenLogprob, ...] | None = None
    refusal: tuple[ChatTokenLogprob, ...] | None = None


@frozen(kw_only=True)
class ChatMessageOut:
    """The assistant message of a chat completion choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


@frozen(kw_only=True)
class ChatChoice:
    """One choice of a chat completion."""

    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


@frozen(kw_only=True)
class ChatCompletion:
    """A ``chat.completion`` object (non-streamed response)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: tuple[ChatChoice, ...]
    usage: Usage
    system_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return _unstructure(self)


@frozen(kw_only=True)
class ChunkDelta:
    """A stream delta; fields that are None are left out of the JSON (as OpenAI does)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


@frozen(kw_only=True)
class ChatChunkChoice:
    """One choice of a stream chunk; ``finish_reason`` is null until the choice ends."""

    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


@frozen(kw_only=True)
class ChatCompletionChunk:
    """A ``chat.completion.chunk`` object.

    ``usage`` is null on every chunk except the final one of a stream with
    ``stream_options.include_usage``, which has ``choices == ()`` and the usage.
    """

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: tuple[ChatChunkChoice, ...]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return _unstructure(self)


@frozen(kw_only=True)
class CompletionLogprobs:
    """``choices[i].logprobs`` of a text completion: parallel lists, one entry per token."""

    tokens: tuple[str, ...] = ()
    token_logprobs: tuple[float | None, ...] = field(default=(), converter=_tuple_of_finite_or_none)
    top_logprobs: tuple[dict[str, float] | None, ...] = field(default=(), converter=_top_maps)
    text_offset: tuple[int, ...] = ()


@frozen(kw_only=True)
class CompletionChoice:
    """One choice of a text completion."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: CompletionFinishReason


@frozen(kw_only=True)
class Completion:
    """A ``text_completion`` object (non-streamed response)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: tuple[CompletionChoice, ...]
    usage: Usage
    system_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return _unstructure(self)


@frozen(kw_only=True)
class CompletionChunkChoice:
    """One choice of a streamed text completion; ``finish_reason`` null until it ends."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: CompletionFinishReason | None = None


@frozen(kw_only=True)
class CompletionChunk:
    """A streamed ``text_completion`` object (same ``object`` value as the non-streamed one).

    ``usage`` is null except on the final chunk of a stream with ``include_usage`` (whose
    ``choices`` is empty).
    """

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: tuple[CompletionChunkChoice, ...]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return _unstructure(self)


@frozen(kw_only=True)
class ModelCard:
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


@frozen(kw_only=True)
class ModelList:
    """The ``GET /v1/models`` body."""

    object: Literal["list"] = "list"
    data: tuple[ModelCard, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return _unstructure(self)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(unstruct_collection_overrides={tuple: list})
    conv.register_unstructure_hook(
        ChunkDelta, make_dict_unstructure_fn(ChunkDelta, conv, _cattrs_omit_if_default=True)
    )
    return conv


_CONVERTER = _make_converter()


def _unstructure(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = _CONVERTER.unstructure(obj)
    return out
