"""Server-Sent Events: an encoder and a sans-IO incremental decoder (WHATWG HTML, 9.2.6).

The decoder takes bytes as they arrive, split anywhere (inside a UTF-8 character, between
``\\r`` and ``\\n``), and returns the events completed by each chunk. It follows the spec's
parsing rules: CR, LF and CRLF line endings, a leading BOM dropped, comment lines, one space
after the colon stripped, multi-line ``data``, ``id`` (kept across events; ignored if it holds
NUL), ``retry`` (digits only) and, at the end of the stream, an unterminated event discarded.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from ._errors import SSEEncodingError

__all__ = ["DONE", "SSEDecoder", "SSEEvent", "encode_comment", "encode_event"]

DONE = b"data: [DONE]\n\n"
"""The line the OpenAI API sends after the last chunk of a stream."""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# one encoder for every event (json.dumps with options builds a new one per call); its output
# never holds a raw CR or LF (JSON escapes control characters), so it is one data line
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise SSEEncodingError(f"SSE {name} must not contain CR, LF or NUL: {value!r}")


def encode_event(
    data: str | Mapping[str, Any] | Sequence[Any],
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Return one SSE event as UTF-8 bytes, ending in a blank line.

    A mapping or list is JSON-encoded compactly (non-ASCII kept as UTF-8); a string with line
    breaks becomes several ``data:`` lines, which decode back to the same string (any of CR,
    LF, CRLF decodes as LF). Raises ``SSEEncodingError`` for a line break or NUL in ``event``
    or ``id``, or a negative ``retry``.
    """
    lines = [_JSON.encode(data)] if not isinstance(data, str) else _LINE_BREAK.split(data)
    parts: list[str] = []
    if event is not None:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise SSEEncodingError(f"SSE retry must be a non-negative integer: {retry!r}")
        parts.append(f"retry: {retry}\n")
    parts.extend(f"data: {line}\n" for line in lines)
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Return a comment line plus blank line (a keep-alive that clients ignore).

    Raises ``SSEEncodingError`` if ``text`` holds a line break.
    """
    _check_field("comment", text)
    return f": {text}\n\n".encode() if text else b":\n\n"


@frozen
class SSEEvent:
    """A dispatched event.

    ``event`` is the type ("message" when the block set none), ``data`` the joined data lines,
    ``id`` the last event id seen so far in the stream ("" if none), ``retry`` the ``retry``
    value given in this event's block (None if none).
    """

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None

    def json(self) -> Any:
        """Return ``data`` decoded as JSON; raises ``ValueError`` if it is not JSON."""
        return json.loads(self.data)


class SSEDecoder:
    """Incremental SSE parser: ``feed`` bytes, get the events they complete; ``close`` at EOF.

    ``last_event_id`` and ``retry`` (the reconnection time in ms, None until set) are the
    stream-level state the spec keeps.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._partial: list[str] = []  # pieces of the current line, not yet terminated
        self._after_cr = False  # the last character seen was a CR: skip a following LF
        self._data: list[str] = []
        self._event = ""
        self._block_retry: int | None = None
        self.last_event_id = ""
        self.retry: int | None = None
        self._closed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events completed by ``chunk`` (possibly none).

        Raises ``SSEEncodingError`` after ``close``.
        """
        if self._closed:
            raise SSEEncodingError("feed() after close()")
        return self._feed_text(self._utf8.decode(chunk))

    def close(self, *, dispatch_incomplete: bool = False) -> list[SSEEvent]:
        """End the stream; return the events still held.

        Per the spec an event with no blank line after it is discarded, so this returns
        ``[]`` unless ``dispatch_incomplete`` asks to dispatch such a trailing event (as some
        lenient clients do). Further ``feed`` calls raise.
        """
        if self._closed:
            return []
        events = self._feed_text(self._utf8.decode(b"", final=True))
        self._closed = True
        if dispatch_incomplete:
            if self._partial:
                self._line("".join(self._partial), events)
            self._partial = []
            self._dispatch(events)
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not text:
            return events
        if self._after_cr and text[0] == "\n":
            text = text[1:]
        self._after_cr = False
        if "\r" not in text and "\n" not in text:
            # still inside a line: keep the pieces, join once the line ends (no quadratic copies)
            self._partial.append(text)
            return events
        buf = "".join(self._partial) + text if self._partial else text
        pos = 0
        for m in _LINE_BREAK.finditer(buf):
            self._line(buf[pos : m.start()], events)
            pos = m.end()
        self._partial = [buf[pos:]] if pos < len(buf) else []
        # A CR at the very end may be the first half of a CRLF split across chunks.
        self._after_cr = pos == len(buf) and buf.endswith("\r")
        return events

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
            self._block_retry = self.retry
        # any other field name is ignored, as the spec says

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(
                SSEEvent(
                    data="\n".join(self._data),
                    event=self._event or "message",
                    id=self.last_event_id,
                    retry=self._block_retry,
                )
            )
        self._data = []
        self._event = ""
        self._block_retry = None
