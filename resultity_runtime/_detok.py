"""Incremental detokenization for streaming: never emits broken UTF-8.

Like vLLM's ``detokenize_incrementally``, each push decodes only a small window of recent
tokens: ``tokens[prefix:read]`` is text already emitted (kept as context) and
``tokens[read:]`` the tokens not yet emitted. The new text is the window's decode minus the
decode of its context part. Two sentencepiece details make this exact:

- sentencepiece drops the leading ``▁`` of pieces while the decoded text is still empty, so a
  window's context must decode to non-empty text; otherwise the context is not moved forward
  (at the very start the window begins at the first token, where that dropping is wanted);
- byte-fallback pieces (``<0xE2>``) decode to U+FFFD until their character completes, so text
  is held back while the window ends in an incomplete UTF-8 sequence. With ``id_to_piece`` the
  check is exact (the trailing byte pieces are run through a UTF-8 decoder); without it, text
  is held while it ends in U+FFFD, for at most 3 pushes in a row (then a genuine U+FFFD is let
  through; invalid bytes followed at once by a split character can then break the text).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["DetokenizerTokenizer", "IncrementalDetokenizer"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt tokens kept as context for the first output token
_MAX_UTF8_HOLD = 4
_COMPACT_AT = 256


class DetokenizerTokenizer(Protocol):
    """What the detokenizer needs from a tokenizer.

    ``decode(ids, skip_special_tokens)`` returns the text of ``ids``. Optional attributes are
    used when present: ``id_to_piece(id) -> str`` (sentencepiece pieces, byte pieces spelled
    ``<0xNN>``) for the exact UTF-8 check, and ``special_ids`` (a collection of ids) which
    are dropped up front when ``skip_special_tokens`` is set.
    """

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def _incomplete_utf8_tail(data: bytes) -> bool:
    """True when ``data`` ends in a valid but unfinished UTF-8 sequence."""
    _, consumed = codecs.utf_8_decode(data, "replace", False)
    return consumed < len(data)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    The concatenation of every ``push`` result and the final ``flush`` equals
    ``tokenizer.decode(output_ids, skip_special_tokens)``; with ``prompt_ids`` the first token
    is decoded in the context of the prompt's last tokens, so its leading space is kept (the
    text is then what decoding prompt + output adds after the prompt's text).
    """

    def __init__(
        self,
        tokenizer: DetokenizerTokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special: frozenset[int] = (
            frozenset(getattr(tokenizer, "special_ids", ())) if skip_special_tokens else frozenset()
        )
        self._id_to_piece: Any = getattr(tokenizer, "id_to_piece", None)
        context = [t for t in (prompt_ids or ()) if t not in self._special][-_PROMPT_CONTEXT:]
        self._tokens: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = self._decode(context)
        self.output_ids: list[int] = []
        self._fffd_run = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it makes safe to emit (maybe "")."""
        self.output_ids.append(token_id)
        if token_id in self._special:
            return ""
        self._tokens.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any held-back text at the end of generation (incomplete bytes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._tokens):
            return ""
        text = self._decode(self._tokens[self._prefix :])
        if not final and self._must_hold(text):
            return ""
        if len(text) <= len(self._prefix_text):
            # nothing visible yet (a leading space sentencepiece drops): keep waiting
            return ""
        delta = text[len(self._prefix_text) :]
        end = len(self._tokens)
        context = self._decode(self._tokens[self._read : end])
        if context:
            self._prefix, self._prefix_text = self._read, context
        else:
            self._prefix_text = text
        self._read = end
        if self._prefix >= _COMPACT_AT:
            del self._tokens[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def _must_hold(self, text: str) -> bool:
        if self._id_to_piece is None:
            self._fffd_run = self._fffd_run + 1 if text.endswith(_REPLACEMENT) else 0
            return 0 < self._fffd_run < _MAX_UTF8_HOLD
        tail = bytearray()
        for token in reversed(self._tokens[self._prefix :]):
            m = _BYTE_PIECE.fullmatch(str(self._id_to_piece(token)))
            if m is None:
                break
            tail.append(int(m.group(1), 16))
            if len(tail) > _MAX_UTF8_HOLD:
                break
        tail.reverse()
        return bool(tail) and _incomplete_utf8_tail(bytes(tail))
