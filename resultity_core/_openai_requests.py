"""OpenAI request types for ``/v1/chat/completions`` and ``/v1/completions``.

Frozen attrs classes whose field names are the JSON names. Range and cross-field checks are
attrs validators, so a request built in Python is as valid as one parsed from JSON; they raise
``FieldError`` naming the field, which the parser turns into an ``InvalidRequestError``.
Unset sampling fields stay ``None`` so that servers can tell "not given" from a default.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs
from attrs import field, frozen

from ._errors import ResultityError

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "FieldError",
    "StreamOptions",
    "TextPart",
]

Role = Literal["system", "user", "assistant", "developer", "tool"]

MAX_STOP = 4
MAX_N = 128
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


class FieldError(ResultityError, ValueError):
    """A value is invalid; ``path`` is relative to the object being built (``["stop", 0]``).

    Raised by the request types' validators when a request is built in Python; the parsers
    turn it into an ``InvalidRequestError``.
    """

    def __init__(self, path: list[str | int], message: str, code: str = "invalid_value") -> None:
        self.path = path
        self.message = message
        self.code = code
        super().__init__(message)


def _in_range(lo: float, hi: float, *, lo_open: bool = False) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: float | None) -> None:
        if value is None:
            return
        low_ok = value > lo if lo_open else value >= lo
        if not (low_ok and value <= hi) or math.isnan(value):
            left = "(" if lo_open else "["
            raise FieldError([attr.name], f"must be in {left}{lo:g}, {hi:g}], got {value!r}")

    return check


def _int_range(lo: int, hi: int) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
        if value is not None and not lo <= value <= hi:
            raise FieldError([attr.name], f"must be an integer in [{lo}, {hi}], got {value}")

    return check


def _check_top_k(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < -1:
        raise FieldError([attr.name], f"must be -1 or 0 (off) or a positive integer, got {value}")


def _check_stop(_inst: object, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if len(value) > MAX_STOP:
        raise FieldError([attr.name], f"at most {MAX_STOP} stop sequences, got {len(value)}")
    for i, s in enumerate(value):
        if not s:
            raise FieldError([attr.name, i], "stop sequences must not be empty")


def _check_logit_bias(
    _inst: object, attr: attrs.Attribute[Any], value: dict[str, float] | None
) -> None:
    for key, bias in (value or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise FieldError([attr.name, key], f"keys must be token ids (digits), got {key!r}")
        if not -100 <= bias <= 100:
            raise FieldError([attr.name, key], f"bias must be in [-100, 100], got {bias!r}")


def _check_non_empty(
    _inst: object, attr: attrs.Attribute[Any], value: str | tuple[Any, ...]
) -> None:
    if len(value) == 0:
        raise FieldError([attr.name], "must not be empty")


@frozen
class TextPart:
    """One ``{"type": "text", "text": ...}`` content part."""

    text: str
    type: Literal["text"] = "text"


@frozen
class ChatMessage:
    """A chat message; ``content`` is a string, text parts, or null (assistant only)."""

    role: Role
    content: str | tuple[TextPart, ...] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.content is None and self.role != "assistant":
            raise FieldError(
                ["content"],
                f"content is required for a {self.role!r} message",
                "missing_required_parameter",
            )

    @property
    def text(self) -> str:
        """Return the content as one string: text parts joined by newlines, null as ''."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


@frozen
class StreamOptions:
    """``stream_options``; only ``include_usage`` has an effect."""

    include_usage: bool = False


@frozen(hash=False)
class ChatCompletionRequest:
    """A parsed ``/v1/chat/completions`` body.

    When both ``max_tokens`` and ``max_completion_tokens`` are given, ``max_completion_tokens``
    (the newer name) wins; see ``effective_max_tokens``.
    """

    model: str = field(validator=_check_non_empty)
    messages: tuple[ChatMessage, ...] = field(validator=_check_non_empty)
    max_tokens: int | None = field(default=None, validator=_int_range(1, 2**31 - 1))
    max_completion_tokens: int | None = field(default=None, validator=_int_range(1, 2**31 - 1))
    stop: tuple[str, ...] = field(default=(), validator=_check_stop)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = field(default=1, validator=_int_range(1, MAX_N))
    seed: int | None = field(default=None, validator=_int_range(_SEED_MIN, _SEED_MAX))
    temperature: float | None = field(default=None, validator=_in_range(0, 2))
    top_p: float | None = field(default=None, validator=_in_range(0, 1, lo_open=True))
    top_k: int | None = field(default=None, validator=_check_top_k)
    min_p: float | None = field(default=None, validator=_in_range(0, 1))
    presence_penalty: float | None = field(default=None, validator=_in_range(-2, 2))
    frequency_penalty: float | None = field(default=None, validator=_in_range(-2, 2))
    logit_bias: dict[str, float] | None = field(default=None, validator=_check_logit_bias)
    logprobs: bool = False
    top_logprobs: int | None = field(default=None, validator=_int_range(0, MAX_TOP_LOGPROBS_CHAT))
    user: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError(["top_logprobs"], "top_logprobs requires logprobs to be true")

    @property
    def effective_max_tokens(self) -> int | None:
        """Return ``max_completion_tokens`` if set, else ``max_tokens`` (None: not limited)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Return whether a streamed response ends with a usage chunk.

        ``stream_options`` without ``stream`` is accepted and has no effect.
        """
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def template_messages(self) -> list[dict[str, str]]:
        """Return the messages as ``[{"role", "content"}]`` with text parts joined (see
        ``ChatMessage.text``): the form a chat template renders."""
        return [{"role": m.role, "content": m.text} for m in self.messages]


@frozen(hash=False)
class CompletionRequest:
    """A parsed ``/v1/completions`` body; ``prompt`` is always a tuple of strings.

    A list of prompts is a batch: choice ``i * n + j`` is the ``j``-th sample of prompt ``i``.
    ``logprobs`` is the number of top alternatives per token (0..5), None for none.
    """

    model: str = field(validator=_check_non_empty)
    prompt: tuple[str, ...] = field(validator=_check_non_empty)
    max_tokens: int | None = field(default=None, validator=_int_range(1, 2**31 - 1))
    stop: tuple[str, ...] = field(default=(), validator=_check_stop)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = field(default=1, validator=_int_range(1, MAX_N))
    seed: int | None = field(default=None, validator=_int_range(_SEED_MIN, _SEED_MAX))
    temperature: float | None = field(default=None, validator=_in_range(0, 2))
    top_p: float | None = field(default=None, validator=_in_range(0, 1, lo_open=True))
    top_k: int | None = field(default=None, validator=_check_top_k)
    min_p: float | None = field(default=None, validator=_in_range(0, 1))
    presence_penalty: float | None = field(default=None, validator=_in_range(-2, 2))
    frequency_penalty: float | None = field(default=None, validator=_in_range(-2, 2))
    logit_bias: dict[str, float] | None = field(default=None, validator=_check_logit_bias)
    logprobs: int | None = field(default=None, validator=_int_range(0, MAX_LOGPROBS_COMPLETION))
    echo: bool = False
    user: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.echo:
            raise FieldError(["echo"], "echo is not supported", "unsupported_value")
        if self.n * len(self.prompt) > MAX_N:
            raise FieldError(["n"], f"n times the number of prompts must be at most {MAX_N}")

    @property
    def effective_max_tokens(self) -> int | None:
        """Return ``max_tokens`` (None: not limited by the request)."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Return whether a streamed response ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage
