"""An async HTTP client on httpcore: JSON requests and streamed (SSE) responses.

One ``HTTPClient`` per peer keeps a pool of keep-alive connections. httpcore's exceptions are
mapped to ``HTTPClientError`` subclasses here, at the border.
"""

from __future__ import annotations

import enum
import json as _json
import select
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, Self

import attrs
import httpcore

from resultity_core import SSEDecoder, SSEEvent

from ._errors import (
    HTTPClientError,
    HTTPConnectError,
    HTTPProtocolError,
    HTTPStatusError,
    HTTPTimeoutError,
)
from ._types import HeaderList

__all__ = ["DEFAULT_TIMEOUT", "ClientResponse", "HTTPClient", "StreamingClientResponse"]

_NO_BODY: Any = object()


class _Default(enum.Enum):
    TIMEOUT = "the client's timeout_s"


DEFAULT_TIMEOUT = _Default.TIMEOUT
"""Per-call ``timeout_s`` default: use the client's. ``None`` instead means no read timeout."""
TimeoutArg = float | None | Literal[_Default.TIMEOUT]


@contextmanager
def _map_errors(url: str) -> Iterator[None]:
    try:
        yield
    except httpcore.ConnectTimeout as exc:
        raise HTTPConnectError(f"timed out connecting: {exc}", url) from exc
    except httpcore.TimeoutException as exc:
        raise HTTPTimeoutError(f"timed out: {exc or type(exc).__name__}", url) from exc
    except httpcore.ConnectError as exc:
        raise HTTPConnectError(f"cannot connect: {exc}", url) from exc
    except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
        raise HTTPProtocolError(f"connection failed: {exc or type(exc).__name__}", url) from exc
    except httpcore.UnsupportedProtocol as exc:
        raise HTTPClientError(f"unsupported URL: {exc}", url) from exc


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> HeaderList:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw)


def _header(headers: HeaderList, name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers if key == wanted), None)


@attrs.frozen
class ClientResponse:
    """A complete response: status, lower-case headers and body bytes."""

    status: int
    headers: HeaderList
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or None."""
        return _header(self.headers, name)

    def json(self) -> Any:
        """Return the body parsed as JSON; raises ValueError if it is not UTF-8 JSON."""
        return _json.loads(self.body.decode("utf-8"))

    def raise_for_status(self) -> Self:
        """Return self if the status is 2xx; raises HTTPStatusError otherwise."""
        if not 200 <= self.status < 300:
            raise HTTPStatusError(self.status, self.body, self.url)
        return self


class StreamingClientResponse:
    """A response whose body is read as it arrives (once: iterate one of the ``aiter_*``)."""

    def __init__(self, response: httpcore.Response, url: str) -> None:
        self._response = response
        self.url = url
        self.status = response.status
        self.headers = _decode_headers(response.headers)

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or None."""
        return _header(self.headers, name)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive; raises HTTPClientError subclasses on failure."""
        with _map_errors(self.url):
            async for chunk in self._response.aiter_stream():
                if chunk:
                    yield chunk

    async def aread(self) -> bytes:
        """Return the rest of the body."""
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aiter_lines(self) -> AsyncIterator[bytes]:
        """Yield body lines without their LF (a final unterminated line is yielded too)."""
        pending = b""
        async for chunk in self.aiter_bytes():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.removesuffix(b"\r")
        if pending:
            yield pending.removesuffix(b"\r")

    async def aiter_sse(self) -> AsyncIterator[SSEEvent]:
        """Yield Server-Sent Events decoded incrementally (resultity_core.SSEDecoder)."""
        decoder = SSEDecoder()
        async for chunk in self.aiter_bytes():
            for event in decoder.feed(chunk):
                yield event
        for event in decoder.close():
            yield event

    def raise_for_status(self) -> Self:
        """Return self if the status is 2xx; raises HTTPStatusError (without body) otherwise."""
        if not 200 <= self.status < 300:
            raise HTTPStatusError(self.status, b"", self.url)
        return self


# A request's writes are held until its response is read, up to this many bytes.
_COALESCE_BYTES = 64 * 1024


class _CoalescingStream(httpcore.AsyncNetworkStream):
    """A connection whose writes wait for the next read (or ``_COALESCE_BYTES``).

    httpcore writes a request's head and body separately; on loopback each write is a
    segment the server wakes up for, and the head alone is not a request it can answer.
    Held back until httpcore reads the response, the request leaves in one send.
    """

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._size = 0
        self._timeout: float | None = None
        # On asyncio this is the transport's TransportSocket, not a socket.socket: both have
        # the fileno() that is_readable below polls.
        sock = stream.get_extra_info("socket")
        self._sock = sock if callable(getattr(sock, "fileno", None)) else None

    async def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            await self._stream.write(data, timeout=self._timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._pending.append(buffer)
        self._size += len(buffer)
        self._timeout = timeout
        if self._size >= _COALESCE_BYTES:
            await self._flush()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()
        return await self._stream.read(max_bytes, timeout=timeout)

    async def aclose(self) -> None:
        self._pending.clear()
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        await self._flush()
        tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        return _CoalescingStream(tls)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._sock is not None:
            # Asked before every reuse of a pooled connection (readable while idle means
            # the server closed it). The wrapped stream answers through anyio's extra(),
            # which builds every socket attribute each time; poll the descriptor directly.
            fd = self._sock.fileno()
            if fd < 0:
                return True  # closed: as httpcore, "readable" (the next read ends)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        return self._stream.get_extra_info(info)


class _CoalescingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend with ``_CoalescingStream`` connections."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None, socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options)
        return _CoalescingStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options)
        return _CoalescingStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class HTTPClient:
    """A keep-alive client for one base URL (``http://127.0.0.1:8000``).

    ``timeout_s`` bounds each wait (connect, write, the next bytes of a response, a free pool
    slot), not the whole exchange, so a long stream that keeps producing is never cut. A call
    may pass its own ``timeout_s``; ``None`` there means no limit on waiting for response bytes.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 64,
        keepalive_expiry_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._pool = httpcore.AsyncConnectionPool(
            max_connections=max_connections, keepalive_expiry=keepalive_expiry_s,
            network_backend=_CoalescingBackend(),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()

    def _prepare(
        self,
        path: str,
        json: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        timeout_s: TimeoutArg,
    ) -> tuple[str, list[tuple[str, str]], bytes | None, dict[str, Any]]:
        url = self.base_url + path
        merged = {k.lower(): v for k, v in self.headers.items()}
        merged.update({k.lower(): v for k, v in (headers or {}).items()})
        if json is not _NO_BODY:
            if content is not None:
                raise ValueError("give json or content, not both")
            content = _json.dumps(json, ensure_ascii=False, separators=(",", ":")).encode()
            merged.setdefault("content-type", "application/json")
        wait = self.timeout_s if timeout_s is DEFAULT_TIMEOUT else timeout_s
        bound = self.timeout_s if wait is None else wait
        timeouts = {
            "connect": min(self.connect_timeout_s, bound),
            "read": wait,  # None: wait for the next bytes as long as it takes
            "write": bound,
            "pool": bound,
        }
        return url, list(merged.items()), content, {"timeout": timeouts}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = _NO_BODY,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: TimeoutArg = DEFAULT_TIMEOUT,
    ) -> ClientResponse:
        """Send one request and return the complete response (any status).

        ``json`` is encoded as the body with ``content-type: application/json``. ``timeout_s``
        overrides the client's for this call; ``None`` waits for response bytes without limit
        (connecting and sending stay bounded). Raises HTTPConnectError, HTTPTimeoutError,
        HTTPProtocolError.
        """
        url, hdrs, body, ext = self._prepare(path, json, content, headers, timeout_s)
        with _map_errors(url):
            response = await self._pool.request(
                method, url, headers=hdrs, content=body, extensions=ext
            )
        return ClientResponse(
            response.status, _decode_headers(response.headers), response.content, url
        )

    async def get_json(self, path: str, *, headers: Mapping[str, str] | None = None) -> Any:
        """Return the JSON body of ``GET path``; raises HTTPStatusError unless 2xx."""
        return (await self.request("GET", path, headers=headers)).raise_for_status().json()

    async def post_json(
        self, path: str, payload: Any, *, headers: Mapping[str, str] | None = None
    ) -> Any:
        """Return the JSON body of ``POST path`` with a JSON payload; raises unless 2xx."""
        response = await self.request("POST", path, json=payload, headers=headers)
        return response.raise_for_status().json()

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = _NO_BODY,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: TimeoutArg = DEFAULT_TIMEOUT,
    ) -> AsyncIterator[StreamingClientResponse]:
        """Send a request and yield the response before its body is read.

        Leaving the block early closes the connection (the server sees a disconnect). Raises
        like ``request``.
        """
        url, hdrs, body, ext = self._prepare(path, json, content, headers, timeout_s)
        with _map_errors(url):
            async with self._pool.stream(
                method, url, headers=hdrs, content=body, extensions=ext
            ) as response:
                yield StreamingClientResponse(response, url)
