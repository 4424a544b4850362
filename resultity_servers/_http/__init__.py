"""The HTTP/1.1 layer shared by the Cloud, Network and Node processes (anyio + h11, httpcore).

Server side: a ``Router`` of ``(method, path)`` to ``async handler(Request)`` returning a
``Response`` or a ``StreamingResponse`` (chunked; SSE), served by ``HTTPServer`` with body
limits, timeouts, a connection cap, disconnect detection and graceful shutdown. Client side:
``HTTPClient`` for JSON requests and streamed bodies.
"""

from __future__ import annotations

from ._client import DEFAULT_TIMEOUT, ClientResponse, HTTPClient, StreamingClientResponse
from ._errors import (
    HTTPClientError,
    HTTPConnectError,
    HTTPProtocolError,
    HTTPStatusError,
    HTTPTimeoutError,
)
from ._router import Router
from ._server import HTTPServer, ServerConfig, running_server
from ._types import (
    ErrorResponder,
    Handler,
    HeaderList,
    Request,
    Response,
    StreamingResponse,
    json_error_response,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClientResponse",
    "ErrorResponder",
    "HTTPClient",
    "HTTPClientError",
    "HTTPConnectError",
    "HTTPProtocolError",
    "HTTPServer",
    "HTTPStatusError",
    "HTTPTimeoutError",
    "Handler",
    "HeaderList",
    "Request",
    "Response",
    "Router",
    "ServerConfig",
    "StreamingClientResponse",
    "StreamingResponse",
    "json_error_response",
    "running_server",
]
