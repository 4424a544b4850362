"""Response framing: status lines, header validation, and the bytes of one response.

h11 validates every request, but a response is not sent through h11 (its header validation and
state bookkeeping were a fifth of the server's time per request); ``ResponseWriter`` serializes
it with h11's framing rules instead: ``content-length`` for complete bodies, chunked for streams
to HTTP/1.1 clients, close-delimited for HTTP/1.0 ones, no body for HEAD, 204 and 304. Header
lines are validated as h11 would and cached once encoded.
"""

from __future__ import annotations

import functools
import re
import time
from email.utils import formatdate
from http import HTTPStatus

import h11

from ._types import HeaderList

__all__ = ["BadResponse", "ResponseWriter"]

_date_cache: tuple[int, bytes] = (0, b"")


def _date_line() -> bytes:
    global _date_cache  # noqa: PLW0603 - one formatted Date per second, shared by all connections
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


class BadResponse(Exception):
    """A handler's response cannot be sent as HTTP (bad status or header)."""


# RFC 9110 field names (tokens) and values, as h11 validates them.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_LINES: dict[tuple[str, str], bytes] = {}  # validated header -> its encoded line
_MAX_CACHED_LINES = 4096
_FRAMING = frozenset({"content-length", "transfer-encoding"})


def _header_line(item: tuple[str, str]) -> bytes:
    line = _LINES.get(item)
    if line is not None:
        return line
    try:
        name, value = item[0].encode("ascii"), item[1].encode("ascii")
    except (UnicodeEncodeError, AttributeError, IndexError) as exc:
        raise BadResponse(f"header {item!r} is not ASCII text") from exc
    if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
        raise BadResponse(f"illegal header {item!r}")
    line = b"%s: %s\r\n" % (name, value)
    if len(_LINES) >= _MAX_CACHED_LINES:
        _LINES.clear()  # handlers that put per-request values in headers: keep it bounded
    _LINES[item] = line
    return line


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


class ResponseWriter:
    """Frames one response to the request ``head`` (None: a layer error, no valid request)."""

    __slots__ = ("chunked", "close", "has_body", "head_only", "http10")

    def __init__(
        self,
        head: h11.Request | None,
        headers: list[tuple[bytes, bytes]],
        closing: bool = False,
    ) -> None:
        self.close = closing
        self.head_only = head is not None and head.method == b"HEAD"
        self.http10 = head is None or head.http_version != b"1.1"
        if head is not None and not self.close:
            # h11's keep-alive rule: HTTP/1.1 without ``connection: close``.
            if self.http10:
                self.close = True
            else:
                for name, value in headers:
                    if name == b"connection" and b"close" in value.lower():
                        self.close = True
        self.has_body = not self.head_only
        self.chunked = False

    def _head(self, status: int, headers: HeaderList, framing: bytes) -> bytes:
        if type(status) is not int:
            if not isinstance(status, int) or isinstance(status, bool):
                raise BadResponse(f"status {status!r} is not an integer")
            status = int(status)  # an HTTPStatus
        if not 200 <= status <= 999:
            raise BadResponse(f"status {status} is not a final HTTP status")
        lines = [_status_line(status)]
        for item in headers:
            if item[0] in _FRAMING:
                continue  # the framing is ours to choose
            if item[0] == "connection" and "close" in item[1].lower():
                self.close = True
                continue  # sent below, once
            lines.append(_header_line(item))
        lines.append(framing)
        lines.append(_date_line())
        lines.append(b"connection: close\r\n\r\n" if self.close else b"\r\n")
        return b"".join(lines)

    def complete(self, status: int, headers: HeaderList, body: bytes) -> bytes:
        """Return the whole response with ``content-length`` framing."""
        if status in (204, 304):
            self.has_body = False
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        return head + body if self.has_body and body else head

    def stream_head(self, status: int, headers: HeaderList) -> bytes:
        """Return the head of a streamed response (chunked, or close-delimited for HTTP/1.0)."""
        if status in (204, 304):
            self.has_body = False
            return self._head(status, headers, b"content-length: 0\r\n")
        if self.http10:
            self.close = self.close or self.has_body
            return self._head(status, headers, b"")
        self.chunked = True
        return self._head(status, headers, b"transfer-encoding: chunked\r\n")

    def chunk(self, data: bytes) -> bytes:
        """Return ``data`` framed as one chunk of the body (as is when close-delimited)."""
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    def end(self) -> bytes:
        """Return what ends the body: the last chunk, or nothing."""
        return b"0\r\n\r\n" if self.chunked else b""
