"""Errors of the HTTP client: httpcore's exceptions mapped at the border to ours."""

from __future__ import annotations

from resultity_core import ResultityError

__all__ = [
    "HTTPClientError",
    "HTTPConnectError",
    "HTTPProtocolError",
    "HTTPStatusError",
    "HTTPTimeoutError",
]


class HTTPClientError(ResultityError):
    """Base of client-side HTTP failures; ``url`` names the request's target."""

    def __init__(self, message: str, url: str) -> None:
        self.url = url
        super().__init__(f"{message} ({url})")


class HTTPConnectError(HTTPClientError):
    """The server could not be reached (refused, unreachable, name not resolved)."""


class HTTPTimeoutError(HTTPClientError):
    """Connecting, sending, or waiting for the next bytes of the response took too long."""


class HTTPProtocolError(HTTPClientError):
    """The connection broke or the peer sent invalid HTTP (for example a truncated body)."""


class HTTPStatusError(HTTPClientError):
    """A response had a status outside 2xx where success was required."""

    def __init__(self, status: int, body: bytes, url: str) -> None:
        self.status = status
        self.body = body
        snippet = body[:200].decode("utf-8", "replace")
        super().__init__(f"HTTP {status}: {snippet}", url)
