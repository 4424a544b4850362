"""What the engine returns: finished request outputs and streaming deltas.

``finish_reason`` uses the OpenAI values ``"stop"`` (EOS, a stop token id or a stop string)
and ``"length"`` (``max_tokens`` or the context limit), plus ``"abort"`` for a request that was
cancelled (the OpenAI API has no value for it; servers usually drop such a choice).
"""

from __future__ import annotations

from typing import Literal

import attrs

from ._sampling import TokenLogprobs

__all__ = [
    "FINISH_REASONS",
    "CompletionOutput",
    "FinishReason",
    "RequestOutput",
    "StreamDelta",
    "Usage",
]

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length", "abort")


@attrs.frozen
class Usage:
    """Token counts of a request; ``completion_tokens`` sums over its ``n`` sequences."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class CompletionOutput:
    """One generated sequence (``index`` 0 .. n-1) of a request.

    ``token_ids`` holds every generated token, including a final EOS or stop token; ``text``
    excludes them and any matched stop string (unless include_stop_str_in_output).
    ``stop_reason`` is the stop string or token id that ended it, None otherwise.
    ``logprobs`` has one entry per generated token when the request asked for logprobs.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None


@attrs.frozen
class RequestOutput:
    """The result of one request; ``text``, ``token_ids``, ``finish_reason``, ``stop_reason``
    and ``logprobs`` are those of ``outputs[0]`` (the only one unless ``n > 1``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    usage: Usage

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> tuple[TokenLogprobs, ...] | None:
        return self.outputs[0].logprobs


@attrs.frozen
class StreamDelta:
    """New output of one sequence of a request since its previous delta.

    ``text`` is safe to show (never a partial stop string, never broken UTF-8); ``token_ids``
    and ``logprobs`` are the tokens sampled since the last delta (the text of a token may
    arrive in a later delta). The last delta of a sequence has ``finish_reason`` set, and
    ``usage`` (for the whole request) once every sequence of the request has finished.
    """

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    usage: Usage | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
