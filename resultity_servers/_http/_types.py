"""What handlers see and return: Request, Response and StreamingResponse.

A handler is ``async def handler(request: Request) -> Response | StreamingResponse``. The
server reads the whole request body (up to its limit) before calling the handler. While the
handler runs and while a streaming body is sent, the server watches the socket: when the client
goes away it sets ``request.disconnected`` and then cancels the handler or the stream, so
cleanup belongs in ``finally`` blocks (or ``anyio.CancelScope(shield=True)`` sections).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs

import anyio
import attrs

__all__ = [
    "ErrorResponder",
    "Handler",
    "HeaderList",
    "Request",
    "Response",
    "StreamingResponse",
    "json_error_response",
]

HeaderList = tuple[tuple[str, str], ...]


def _headers(value: Iterable[tuple[str, str]] | Mapping[str, str]) -> HeaderList:
    if type(value) is tuple:
        for item in value:
            if type(item) is not tuple or len(item) != 2 or not item[0].islower():
                break
        else:
            return value  # already a tuple of (lower-case name, value) pairs: as it is
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((name.lower(), val) for name, val in items)


@attrs.frozen(eq=False)
class Request:
    """One HTTP request with its complete body.

    ``path`` is the percent-decoded path without the query; ``query`` is the raw query string;
    header names are lower case. ``path_params`` holds ``{name}`` segments matched by the
    Router. ``disconnected`` is set when the client closes the connection before the response
    is complete.
    """

    method: str
    path: str
    query: str = ""
    headers: HeaderList = attrs.field(default=(), converter=_headers)
    body: bytes = b""
    client: tuple[str, int] | None = None
    http_version: str = "1.1"
    path_params: Mapping[str, str] = attrs.field(factory=dict)
    disconnected: anyio.Event = attrs.field(factory=anyio.Event)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), else ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return default

    def query_params(self) -> dict[str, list[str]]:
        """Return the parsed query string (every value of each name, blank values kept)."""
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """Return the body parsed as JSON; raises ValueError if it is not UTF-8 JSON."""
        return json.loads(self.body.decode("utf-8"))

    def is_disconnected(self) -> bool:
        """Return True once the server has seen the client go away."""
        return self.disconnected.is_set()


@attrs.frozen
class Response:
    """A complete response; ``content-length`` is added by the server."""

    status: int = 200
    headers: HeaderList = attrs.field(default=(), converter=_headers)
    body: bytes = b""

    @classmethod
    def json(
        cls,
        value: Any,
        status: int = 200,
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    ) -> Response:
        """Return a response with ``value`` as compact UTF-8 JSON."""
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return cls(status, (("content-type", "application/json"), *_headers(headers)), body)

    @classmethod
    def text(
        cls,
        text: str,
        status: int = 200,
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> Response:
        """Return a response with ``text`` encoded as UTF-8."""
        return cls(status, (("content-type", content_type), *_headers(headers)), text.encode())


@attrs.frozen
class StreamingResponse:
    """A response whose body is produced chunk by chunk and sent with chunked encoding.

    Empty chunks are skipped. If ``chunks`` is an async generator the server closes it when the
    response ends, fails, or the client disconnects. The head goes out with the first chunk
    when that is ready at once, else on its own; ``hold_head_s`` lets it wait that long for
    the first chunk (for a peer that needs nothing before it, on a busy event loop).
    """

    chunks: AsyncIterable[bytes]
    status: int = 200
    headers: HeaderList = attrs.field(default=(), converter=_headers)
    hold_head_s: float = 0.0

    @classmethod
    def sse(
        cls,
        events: AsyncIterable[bytes],
        status: int = 200,
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        *,
        hold_head_s: float = 0.0,
    ) -> StreamingResponse:
        """Return a Server-Sent Events response; each chunk is one or more encoded events."""
        base = (
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        )
        return cls(events, status, (*base, *_headers(headers)), hold_head_s)


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
ErrorResponder = Callable[[int, str], Response]

_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}


def json_error_response(status: int, message: str) -> Response:
    """Return the default body of errors the HTTP layer itself produces.

    It has the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` so that
    every process answers layer errors (400, 404, 405, 408, 413, 431, 500, 503) the same way.
    """
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return Response.json(body, status=status)
