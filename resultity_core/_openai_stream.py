"""Building OpenAI responses from generated text, one choice at a time (sans-IO).

A server feeds what the engine yields (``add`` a piece of text to choice ``i``, ``finish``
it); each call returns the stream chunk to send, and the same builder gives the final
non-streamed object. The builders keep the OpenAI stream shape right: a first chat chunk
with ``role``, ``finish_reason`` only on a choice's last chunk, a usage chunk with no
choices at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from attrs import define, field

from ._errors import InternalServerError
from ._openai_responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionFinishReason,
    CompletionLogprobs,
    FinishReason,
    Usage,
)

__all__ = ["ChatResponseBuilder", "CompletionResponseBuilder"]


@define
class _Choices:
    n: int
    texts: list[list[str]] = field(init=False)
    finish: list[str | None] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.texts = [[] for _ in range(self.n)]
        self.finish = [None] * self.n

    def open(self, index: int) -> None:
        if not 0 <= index < self.n:
            raise InternalServerError(f"choice index {index} is out of range (n={self.n})")
        if self.finish[index] is not None:
            raise InternalServerError(f"choice {index} has already finished")

    def unfinished(self) -> list[int]:
        return [i for i, r in enumerate(self.finish) if r is None]

    def check_all_finished(self) -> None:
        if self.unfinished():
            raise InternalServerError(f"choices {self.unfinished()} have not finished")


@define
class ChatResponseBuilder:
    """Chunks of a streamed ``chat.completion`` and the final object, for ``n`` choices.

    Methods raise ``InternalServerError`` (a server bug, not bad input) for an index out of
    range, text after a choice finished, or ``completion()`` before every choice finished.
    """

    id: str
    created: int
    model: str
    n: int = 1
    system_fingerprint: str | None = None
    _choices: _Choices = field(init=False)
    _logprobs: list[list[ChatTokenLogprob]] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._choices = _Choices(self.n)
        self._logprobs = [[] for _ in range(self.n)]

    def _chunk(
        self, choices: tuple[ChatChunkChoice, ...], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )

    def start(self) -> ChatCompletionChunk:
        """Return the first chunk: ``role: assistant`` and empty content for every choice."""
        delta = ChunkDelta(role="assistant", content="")
        return self._chunk(tuple(ChatChunkChoice(index=i, delta=delta) for i in range(self.n)))

    def add(
        self, index: int, text: str, logprobs: Sequence[ChatTokenLogprob] = ()
    ) -> ChatCompletionChunk:
        """Record ``text`` (and its tokens' logprobs) for choice ``index``; return its chunk."""
        self._choices.open(index)
        self._choices.texts[index].append(text)
        self._logprobs[index].extend(logprobs)
        lp = ChatLogprobs(content=tuple(logprobs)) if logprobs else None
        return self._chunk(
            (ChatChunkChoice(index=index, delta=ChunkDelta(content=text), logprobs=lp),)
        )

    def finish(self, index: int, reason: FinishReason) -> ChatCompletionChunk:
        """End choice ``index``; return the chunk carrying its ``finish_reason``."""
        self._choices.open(index)
        self._choices.finish[index] = reason
        return self._chunk(
            (ChatChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason),)
        )

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        """Return the last chunk of a stream with ``include_usage``: no choices, the usage."""
        return self._chunk((), usage)

    def completion(self, usage: Usage, *, logprobs: bool = False) -> ChatCompletion:
        """Return the non-streamed object; ``logprobs`` includes the recorded logprobs."""
        self._choices.check_all_finished()
        choices = tuple(
            ChatChoice(
                index=i,
                message=ChatMessageOut(content="".join(self._choices.texts[i])),
                logprobs=ChatLogprobs(content=tuple(self._logprobs[i])) if logprobs else None,
                finish_reason=cast(FinishReason, reason),  # set by finish()
            )
            for i, reason in enumerate(self._choices.finish)
        )
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )


def _merge(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=tuple(t for p in parts for t in p.tokens),
        token_logprobs=tuple(t for p in parts for t in p.token_logprobs),
        top_logprobs=tuple(t for p in parts for t in p.top_logprobs),
        text_offset=tuple(t for p in parts for t in p.text_offset),
    )


@define
class CompletionResponseBuilder:
    """Chunks of a streamed ``text_completion`` and the final object, for ``n`` choices.

    For a batch of prompts, choice ``i * n_per_prompt + j`` is sample ``j`` of prompt ``i``;
    pass the total as ``n``. ``text_offset`` values are the caller's (absolute) offsets.
    Raises like ``ChatResponseBuilder``.
    """

    id: str
    created: int
    model: str
    n: int = 1
    system_fingerprint: str | None = None
    _choices: _Choices = field(init=False)
    _logprobs: list[list[CompletionLogprobs]] = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._choices = _Choices(self.n)
        self._logprobs = [[] for _ in range(self.n)]

    def _chunk(
        self, choices: tuple[CompletionChunkChoice, ...], usage: Usage | None = None
    ) -> CompletionChunk:
        return CompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )

    def add(
        self, index: int, text: str, logprobs: CompletionLogprobs | None = None
    ) -> CompletionChunk:
        """Record ``text`` (and its tokens' logprobs) for choice ``index``; return its chunk."""
        self._choices.open(index)
        self._choices.texts[index].append(text)
        if logprobs is not None:
            self._logprobs[index].append(logprobs)
        return self._chunk((CompletionChunkChoice(index=index, text=text, logprobs=logprobs),))

    def finish(self, index: int, reason: CompletionFinishReason) -> CompletionChunk:
        """End choice ``index``; return the chunk carrying its ``finish_reason``."""
        self._choices.open(index)
        self._choices.finish[index] = reason
        return self._chunk((CompletionChunkChoice(index=index, text="", finish_reason=reason),))

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        """Return the last chunk of a stream with ``include_usage``: no choices, the usage."""
        return self._chunk((), usage)

    def completion(self, usage: Usage, *, logprobs: bool = False) -> Completion:
        """Return the non-streamed object; ``logprobs`` includes the recorded logprobs."""
        self._choices.check_all_finished()
        choices = tuple(
            CompletionChoice(
                text="".join(self._choices.texts[i]),
                index=i,
                logprobs=_merge(self._logprobs[i]) if logprobs else None,
                finish_reason=cast(CompletionFinishReason, reason),  # set by finish()
            )
            for i, reason in enumerate(self._choices.finish)
        )
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.system_fingerprint,
        )
